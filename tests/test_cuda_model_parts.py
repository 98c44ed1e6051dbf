"""Parts of benchmarks/cuda_model.py on hand-made instructions (no nvcc needed): the blocks
that only call a compiler slow path (not charged), the --lines attribution of a kernel's
instructions to its source lines, and the check of --lines' kernel name before anything is
compiled."""

from __future__ import annotations

import re
import sys

import pytest

from mnist_testing import REPO

sys.path.insert(0, str(REPO))  # benchmarks, when pytest is not run from the root
from benchmarks import cuda_model  # noqa: E402


def _instruction(opcode: str, chain: tuple) -> cuda_model.Instruction:
    return cuda_model.Instruction(opcode, f"{opcode} R0, R1, R2", chain[0] if chain else None, chain)


def _block(*texts: str) -> list[cuda_model.Instruction]:
    """Instructions as parse_sass makes them: the opcode without the guard predicate."""
    return [cuda_model.Instruction(re.sub(r"^@!?P\w+\s+", "", text).split()[0], text, None, ()) for text in texts]


def test_a_block_that_only_calls_a_slow_path_is_not_charged():
    call = "CALL.REL.NOINC `($__internal_4_$__cuda_sm20_rcp_rn_f32_slowpath)"
    assert cuda_model.slow_path_call(_block("MOV R4, R72", "MOV R5, 0x2b50", call, "BRA `(.L_x_522)"))
    assert cuda_model.slow_path_call(_block("IMAD.MOV.U32 R4, RZ, RZ, R7", call, "BRA `(.L_x_9)"))
    # Work in the block, another callee, or no call: the block runs or may run.
    assert not cuda_model.slow_path_call(_block("FFMA R1, R2, R3, R4", call, "BRA `(.L_x_522)"))
    assert not cuda_model.slow_path_call(_block("MOV R4, R72", "CALL.REL.NOINC `(helper)", "BRA `(.L_x_1)"))
    assert not cuda_model.slow_path_call(_block("MOV R4, R72", "BRA `(.L_x_1)"))
    # In a kernel: the fast path after the branch stays counted, the call's block does not.
    instructions = _block(
        "ISETP.GT.U32.AND P0, PT, R6, 0x1ffffff, PT", "@P0 BRA `(.L_x_2)",
        "MOV R4, R72", "MOV R5, 0x2b50", call, "BRA `(.L_x_3)",
        "MUFU.RCP R5, R72", "FFMA R4, R72, R5, -1",
        "EXIT",
    )
    labels = {"L_x_2": 6, "L_x_3": 8}
    assert cuda_model.cold_instructions(instructions, labels, {}) == [False] * 2 + [True] * 4 + [False] * 3


def test_costs_add_up_per_kernel_line_and_innermost_line():
    kernel_line = ("routing_forward.cuh", 144)
    fma_line = ("cmath", 1399)
    load_line = ("routing_device.cuh", 98)
    instructions = [
        _instruction("FFMA", (fma_line, kernel_line)),
        _instruction("FFMA", (fma_line, kernel_line)),
        _instruction("LDG.E.128", (load_line, kernel_line)),
        _instruction("IADD3", (kernel_line,)),
        _instruction("BAR.SYNC", (load_line, kernel_line)),  # never issued: weight 0
        _instruction("EXIT", ()),
    ]
    weights = [18.0, 18.0, 18.0, 2.0, 0.0, 1.0]
    costs = cuda_model.source_line_costs(instructions, weights)
    assert costs == {
        (kernel_line, fma_line): {"ffma": 36.0},
        (kernel_line, load_line): {"ldg.128": 18.0},
        (kernel_line, kernel_line): {"integer": 2.0},
        (None, None): {"control": 1.0},
    }
    total = sum(sum(classes.values()) for classes in costs.values())
    assert total == pytest.approx(sum(weights))


def test_the_table_ranks_lines_by_instructions_with_their_share():
    row = cuda_model.KernelEstimate("forward_iteration_kernel<kLater>", per_warp=100.0)
    row.source_lines = {
        (("a.cuh", 1), ("b.h", 2)): {"integer": 10.0},
        (("a.cuh", 3), ("cmath", 4)): {"ffma": 60.0, "integer": 5.0},
        (("a.cuh", 5), ("a.cuh", 5)): {"lds": 25.0},
    }
    lines = cuda_model.format_source_lines(row, top=2).splitlines()
    assert lines[0].startswith("forward_iteration_kernel<kLater>: 100 warp-instructions per warp; its top 2")
    body = lines[3:]
    assert len(body) == 2
    assert body[0] == "| a.cuh:3 | cmath:4 | 65 | 65.0% | ffma 60, integer 5 |"
    assert body[1] == "| a.cuh:5 | a.cuh:5 | 25 | 25.0% | lds 25 |"


def test_an_unknown_kernel_name_stops_before_the_compile(monkeypatch, capsys):
    def no_compile(*_args, **_kwargs):
        raise AssertionError("the kernels were compiled for a name that matches none of them")

    monkeypatch.setattr(cuda_model, "estimate", no_compile)
    assert cuda_model.main(["--lines", "kLaterr"]) == 2
    message = capsys.readouterr().err
    assert "--lines 'kLaterr' matches no kernel of this call" in message
    assert "forward_iteration_kernel<kLater, staged>" in message and "gradient_kernel<narrow>" in message


@pytest.mark.parametrize("launch, profiled, key", [
    ("forward_iteration_kernel<scalar_t, Tile, ForwardStep::kLater>",
     "void capsnet::cuda::forward_iteration_kernel<float, capsnet::cuda::CapsNetTile, (capsnet::cuda::ForwardStep)2, 0>"
     "(capsnet::cuda::ForwardParams<float>)", "forward_iteration_kernel<kLater>"),
    ("forward_iteration_kernel<scalar_t, Tile, ForwardStep::kLater, kInputRingSlots>",
     "void capsnet::cuda::forward_iteration_kernel<float, capsnet::cuda::CapsNetTile, (capsnet::cuda::ForwardStep)2, 3>"
     "(capsnet::cuda::ForwardParams<float>)", "forward_iteration_kernel<kLater, staged>"),
    ("forward_iteration_kernel<scalar_t, Tile, ForwardStep::kUniformFirst, kInputRingSlots>",
     "void capsnet::cuda::forward_iteration_kernel<float, capsnet::cuda::CapsNetTile, capsnet::cuda::ForwardStep::kUniformFirst, 3>"
     "(capsnet::cuda::ForwardParams<float>)", "forward_iteration_kernel<kUniformFirst, staged>"),
    ("backward_sweep_kernel<scalar_t, Tile, SweepPass::kLogitGrads, false>",
     "void capsnet::cuda::backward_sweep_kernel<float, capsnet::cuda::CapsNetTile, (capsnet::cuda::SweepPass)1, false, 0>"
     "(capsnet::cuda::BackwardParams<float>)", "backward_sweep_kernel<kLogitGrads>"),
    ("backward_sweep_kernel<scalar_t, Tile, SweepPass::kFirstLogitGrads, true, kInputRingSlots>",
     "void capsnet::cuda::backward_sweep_kernel<float, capsnet::cuda::CapsNetTile, (capsnet::cuda::SweepPass)0, true, 3>"
     "(capsnet::cuda::BackwardParams<float>)", "backward_sweep_kernel<kFirstLogitGrads, staged>"),
    ("gradient_kernel<scalar_t, Tile, kWideGradientRows>",
     "void capsnet::cuda::gradient_kernel<float, capsnet::cuda::CapsNetTile, 8, false>(capsnet::cuda::BackwardParams<float>)",
     "gradient_kernel<wide>"),
    ("gradient_kernel<scalar_t, Tile, kNarrowGradientRows, true>",
     "void capsnet::cuda::gradient_kernel<float, capsnet::cuda::CapsNetTile, 4, true>(capsnet::cuda::BackwardParams<float>)",
     "gradient_kernel<narrow>"),
    ("gradient_kernel<scalar_t, Tile, kNarrowGradientRows, false>",
     "void capsnet::cuda::gradient_kernel<float, capsnet::cuda::CapsNetTile, 4, false>(capsnet::cuda::BackwardParams<float>)",
     "gradient_kernel<narrow, at use>"),
    ("gradient_kernel<scalar_t, Tile>",
     "void capsnet::cuda::gradient_kernel<double, capsnet::cuda::CapsNetTile, 4, false>(capsnet::cuda::BackwardParams<double>)",
     "gradient_kernel"),
    ("gradient_kernel<scalar_t, Tile>",
     "void capsnet::cuda::gradient_kernel<c10::Half, capsnet::cuda::CapsNetTile, 4, true>(capsnet::cuda::BackwardParams<c10::Half>)",
     "gradient_kernel"),
])
def test_the_model_and_the_profiler_name_a_kernel_alike(launch, profiled, key):
    """The model's row (from the emulator's launch log) and the profiler's event (the
    demangled name, enumerators as numbers or names, the ring's slots as the last argument)
    meet under one key, so that cuda_profile puts a measured time beside its estimate."""
    from benchmarks import cuda_profile

    assert cuda_model.row_key(launch) == key
    assert cuda_profile.model_key(profiled) == key
