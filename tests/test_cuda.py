"""The CUDA kernels on a GPU (every test is ``needs_cuda``: skipped where no GPU is visible).

The device-parametrised tests (test_fused_vs_reference, test_op_registration,
test_determinism) already run their small cases on "cuda". This file adds what is specific
to the CUDA kernels: both tile classes (the CapsNet tile needs D_in = 8, which those cases
mostly lack), the CapsNet shape at real batch sizes, agreement with the CPU kernel on every
output (saved state included), float64 gradcheck, opcheck and torch.compile on the CapsNet
tile, bitwise determinism across many blocks, B = 1024, autocast, streams and devices.
The same kernels run without a GPU in test_cuda_emulated.py.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import pytest
import torch

import capsnet
import capsnet.autocast  # noqa: F401  (registers the autocast rule; ops.py imports it too)
from capsnet import dynamic_routing
from routing_testing import RoutingCase, assert_close_report, make_inputs, run_routing

pytestmark = pytest.mark.needs_cuda

CAPSNET_TILE = RoutingCase(batch=3, num_in=40, num_out=10, dim_out=16, dim_in=8, iterations=3)
GENERIC_TILE = RoutingCase(batch=3, num_in=40, num_out=4, dim_out=5, dim_in=3, iterations=3)


def capsnet_case(batch, iterations=3, with_bias=True):
    return RoutingCase(batch, 1152, 10, 16, 8, iterations=iterations, with_bias=with_bias)


def _to(tensors, **kwargs):
    return [None if t is None else t.detach().to(**kwargs).requires_grad_(t.requires_grad) for t in tensors]


def test_cuda_kernel_is_registered():
    """On a GPU the fused path must be the CUDA kernel, not a silent fallback."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert capsnet.has_kernel("cuda", dtype), capsnet._extension.missing_reason("cuda", dtype)
    assert capsnet._extension.cuda_device_problem(torch.device("cuda", 0)) is None


def run_options(u, W, bias, prior, grad_v, iterations, backend, leaky=False, detach=False):
    """v, the couplings and the gradients of (v * grad_v).sum() for the routing options."""
    v, c = dynamic_routing(
        u, W, bias, iterations, leaky=leaky, detach_routing=detach, logit_prior=prior, return_couplings=True,
        backend=backend,
    )
    wrt = [t for t in (u, W, bias, prior) if t is not None]
    names = ["grad_u", "grad_W"] + (["grad_bias"] if bias is not None else []) + (["grad_prior"] if prior is not None else [])
    grads = torch.autograd.grad(v, wrt, grad_v, allow_unused=True)
    out = dict(v=v.detach(), couplings=c)
    for name, grad in zip(names, grads):
        if name == "grad_prior" and detach:
            assert grad is None  # a constant under detach_routing
            continue
        out[name] = grad
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "case",
    [
        capsnet_case(1, iterations=1),
        capsnet_case(3, with_bias=False),
        capsnet_case(37),  # two tiles of samples, the second mostly idle lanes
        capsnet_case(128, iterations=2),
        RoutingCase(33, 70, 40, 3, 2, iterations=4),  # N_out > 32: fewer samples per block
        RoutingCase(4, 20, 6, 20, 8, iterations=3),  # D_out > 16 with D_in = 8: generic tile
    ],
    ids=str,
)
def test_matches_reference(case, dtype):
    """Values and every gradient against the reference, evaluated in float64 on the GPU."""
    u, W, bias, grad_v = make_inputs(case, dtype=dtype, device="cuda")
    expected_inputs = _to([u, W, bias], dtype=torch.float64)
    expected = run_routing(*expected_inputs, grad_v.double(), case.iterations, backend="reference")
    actual = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    for name in expected:
        assert actual[name].dtype == dtype
        assert_close_report(actual[name], expected[name], f"{case} {name}", dtype=dtype)


OPTIONS = [(False, False, False), (True, False, False), (False, True, False), (True, True, True), (False, False, True)]


def option_id(flags):
    return "-".join(name for name, on in zip(("prior", "leaky", "detach"), flags) if on) or "default"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("flags", OPTIONS, ids=option_id)
@pytest.mark.parametrize("case", [CAPSNET_TILE, GENERIC_TILE, capsnet_case(37)], ids=str)
def test_options_match_reference(case, flags, dtype):
    """logit_prior, leaky, detach_routing: values, couplings and every gradient."""
    with_prior, leaky, detach = flags
    u, W, bias, grad_v = make_inputs(case, dtype=dtype, device="cuda")
    prior = (0.5 * torch.randn(case.num_in, case.num_out, dtype=dtype, device="cuda")).requires_grad_() if with_prior else None
    expected_inputs = _to([u, W, bias, prior], dtype=torch.float64)
    expected = run_options(*expected_inputs, grad_v.double(), case.iterations, "reference", leaky, detach)
    actual = run_options(u, W, bias, prior, grad_v, case.iterations, "fused", leaky, detach)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close_report(actual[name], expected[name], f"{case} {option_id(flags)} {name}", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("flags", [(False, False, False), (True, True, False), (True, False, True)], ids=option_id)
@pytest.mark.parametrize("case", [CAPSNET_TILE, GENERIC_TILE, capsnet_case(5)], ids=str)
def test_matches_cpu_kernel(case, flags, dtype):
    """Every output of both ops, s_saved included."""
    assert capsnet.has_kernel("cpu", dtype), "capsnet._C has CUDA kernels but no CPU kernel"
    with_prior, leaky, detach = flags
    u, W, bias, grad_v = make_inputs(case, dtype=dtype, device="cuda", requires_grad=False)
    prior = torch.randn(case.num_in, case.num_out, dtype=dtype, device="cuda") if with_prior else None
    r = case.iterations
    gpu_forward = torch.ops.capsnet.routing_forward(u, W, bias, prior, r, leaky, detach, True)
    gpu_backward = torch.ops.capsnet.routing_backward(grad_v, u, W, prior, gpu_forward[1], leaky, detach)
    cpu = [None if t is None else t.cpu() for t in (u, W, bias, prior, grad_v)]
    cpu_forward = torch.ops.capsnet.routing_forward(cpu[0], cpu[1], cpu[2], cpu[3], r, leaky, detach, True)
    cpu_backward = torch.ops.capsnet.routing_backward(cpu[4], cpu[0], cpu[1], cpu[3], cpu_forward[1], leaky, detach)
    names = ("v", "s_saved", "couplings", "grad_u", "grad_W", "grad_bias", "grad_prior")
    for name, actual, expected in zip(names, (*gpu_forward, *gpu_backward), (*cpu_forward, *cpu_backward)):
        assert actual.is_cuda
        assert_close_report(actual, expected, f"{case} {name}")


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [capsnet_case(16), GENERIC_TILE], ids=str)
def test_half_precision_accuracy(case, half):
    """float16/bfloat16 kernels with float32 math: error against a float64 reference at most
    twice that of the reference computed in the same low precision."""
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float64, device="cuda", requires_grad=False)
    prior = 0.5 * torch.randn(case.num_in, case.num_out, dtype=torch.float64, device="cuda")

    def run(dtype, backend):
        inputs = [t.to(dtype).requires_grad_() for t in (u, W, bias, prior)]
        return run_options(*inputs, grad_v.to(dtype), case.iterations, backend, leaky=True)

    exact = run(torch.float64, "reference")
    low = run(half, "reference")
    fused = run(half, "fused")
    for name in exact:
        assert fused[name].dtype == half, name
        ours = (fused[name].double() - exact[name]).abs().max().item()
        theirs = (low[name].double() - exact[name]).abs().max().item()
        assert ours <= 2 * theirs, f"{name} ({half}): error {ours:.3e} > 2 x {theirs:.3e}"


class CapturedStep(NamedTuple):
    """A CUDA graph of one fused forward and backward. A graph replays with the addresses it
    captured and holds no reference to its inputs: `inputs` keeps them alive, else the
    caching allocator hands their memory to later work and the replays read that instead."""

    graph: torch.cuda.CUDAGraph
    inputs: list  # the copies of (u, W, bias) the graph reads
    outputs: tuple  # (v, grad_u, grad_W, grad_bias), written by each replay


def captured_step(u, W, bias, grad_v, iterations) -> CapturedStep:
    """Captures one fused forward and backward on copies of (u, W, bias), warmed up on a side
    stream first (as torch.cuda.graph asks)."""
    static = [t.detach().clone().requires_grad_() for t in (u, W, bias)]

    def step():
        v = dynamic_routing(*static, iterations, backend="fused")
        return (v.detach(), *torch.autograd.grad(v, static, grad_v))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the graph
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return CapturedStep(graph, static, outputs)


def test_cuda_graph_capture():
    """Forward and backward captured in a CUDA graph and replayed: no launch on another
    stream, no host synchronisation, no allocation outside the graph's pool. Between the
    replays, other work allocates and writes memory (as a training loop would): a replay
    reads only its own pool and its inputs."""
    case = capsnet_case(32)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device="cuda")
    expected = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    captured = captured_step(u, W, bias, grad_v, case.iterations)
    for _ in range(2):
        captured.graph.replay()
        torch.cuda.synchronize()
        for name, actual in zip(("v", "grad_u", "grad_W", "grad_bias"), captured.outputs):
            assert torch.equal(actual, expected[name]), name
        # Other work: NaN in new blocks of the inputs' sizes, where freed inputs would be.
        scratch = [torch.full_like(t, float("nan")) for t in (u, W, bias, grad_v)]
        del scratch


@pytest.mark.parametrize("case", [CAPSNET_TILE, GENERIC_TILE], ids=str)
def test_gradcheck_float64(case):
    small = RoutingCase(2, 4, case.num_out, case.dim_out, case.dim_in, iterations=3)
    u, W, bias, _ = make_inputs(small, dtype=torch.float64, device="cuda")
    assert torch.autograd.gradcheck(
        lambda u, W, bias: dynamic_routing(u, W, bias, small.iterations, backend="fused"),
        (u, W, bias),
        eps=1e-6,
        atol=1e-7,
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_opcheck_capsnet_tile(dtype):
    u, W, bias, grad_v = make_inputs(CAPSNET_TILE, dtype=dtype, device="cuda")
    prior = torch.randn(CAPSNET_TILE.num_in, CAPSNET_TILE.num_out, dtype=dtype, device="cuda", requires_grad=True)
    for leaky, detach, couplings in [(False, False, False), (True, False, True), (False, True, True)]:
        torch.library.opcheck(
            torch.ops.capsnet.routing_forward.default, (u, W, bias, prior, 3, leaky, detach, couplings)
        )
        with torch.no_grad():
            _, s_saved, _ = torch.ops.capsnet.routing_forward(u, W, bias, prior, 3, leaky, detach, couplings)
        torch.library.opcheck(
            torch.ops.capsnet.routing_backward.default,
            (grad_v, u.detach(), W.detach(), prior.detach(), s_saved, leaky, detach),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


def test_torch_compile_fullgraph_capsnet_shape():
    case = capsnet_case(8)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device="cuda")

    def layer(u, W, bias):
        return dynamic_routing(torch.tanh(u), W, bias, case.iterations, backend="fused").norm(dim=-1)

    eager = layer(u, W, bias)
    eager_grads = torch.autograd.grad(eager.sum(), (u, W, bias))
    compiled = torch.compile(layer, fullgraph=True)(u, W, bias)
    compiled_grads = torch.autograd.grad(compiled.sum(), (u, W, bias))
    assert_close_report(compiled, eager, "lengths")
    for name, actual, expected in zip(("grad_u", "grad_W", "grad_bias"), compiled_grads, eager_grads):
        assert_close_report(actual, expected, name)


def test_kept_tree_counters():
    """The chunk trees' counters are zeroed once per stream and kept (tree_counters.h): calls
    that reuse them, a larger call that replaces them, two streams running at once and a CUDA
    graph captured before the replacement all give bitwise the results of the first call."""
    small, large = capsnet_case(32), capsnet_case(200)
    small_inputs = make_inputs(small, dtype=torch.float32, device="cuda")
    large_inputs = make_inputs(large, dtype=torch.float32, device="cuda")
    expected_small = run_routing(*small_inputs, small.iterations, backend="fused")
    captured = captured_step(*small_inputs, small.iterations)
    expected_large = run_routing(*large_inputs, large.iterations, backend="fused")  # replaces the kept counters
    other = torch.cuda.Stream()
    other.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(other):  # a larger call on another stream, concurrently with the replays
        on_other = run_routing(*large_inputs, large.iterations, backend="fused")
    for _ in range(2):
        captured.graph.replay()
    again_small = run_routing(*small_inputs, small.iterations, backend="fused")
    torch.cuda.synchronize()
    for name, actual in zip(("v", "grad_u", "grad_W", "grad_bias"), captured.outputs):
        assert torch.equal(actual, expected_small[name]), f"graph replay: {name}"
    for name in expected_small:
        assert torch.equal(again_small[name], expected_small[name]), f"small call after a large one: {name}"
        assert torch.equal(on_other[name], expected_large[name]), f"call on another stream: {name}"


def test_bitwise_deterministic_across_many_blocks():
    """B = 256: hundreds of blocks, all sums in a fixed order, no atomics."""
    case = capsnet_case(256)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device="cuda")
    first = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    for _ in range(3):
        again = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
        for name in first:
            assert torch.equal(first[name], again[name]), f"{name} differs between runs"


@pytest.mark.parametrize("choices", ["inputs_per_chunk=1,sample_groups=1", "inputs_per_chunk=200,sample_groups=8"])
def test_plan_choices(monkeypatch, choices):
    """CAPSNET_CUDA_PLAN (benchmarks/plan_sweep.py) changes the plan, read on every call; the
    results stay those of the reference."""
    case = capsnet_case(64)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device="cuda")
    expected_inputs = _to([u, W, bias], dtype=torch.float64)
    expected = run_routing(*expected_inputs, grad_v.double(), case.iterations, backend="reference")
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", choices)
    actual = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    for name in expected:
        assert_close_report(actual[name], expected[name], f"{choices} {name}", dtype=torch.float32)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "sample_groups=3")
    with pytest.raises(RuntimeError, match="CAPSNET_CUDA_PLAN: sample_groups must be 1, 2, 4 or 8, got 3"):
        run_routing(u, W, bias, grad_v, case.iterations, backend="fused")


def assert_plans_give_the_same_bits(monkeypatch, batch, baseline_plan, plan, what, device="cuda", **options):
    """A CapsNet-shape float32 forward+backward under CAPSNET_CUDA_PLAN=`baseline_plan` once
    and under `plan` three times: every output the very bits of the baseline's, and the
    float64 reference's values. `what` names `plan`'s kernels in the messages."""
    case = capsnet_case(batch)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device=device)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", baseline_plan)
    baseline = run_routing(u, W, bias, grad_v, case.iterations, backend="fused", **options)
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", plan)
    for _ in range(3):
        actual = run_routing(u, W, bias, grad_v, case.iterations, backend="fused", **options)
        for name in baseline:
            assert torch.equal(actual[name], baseline[name]), f"B={batch} {name}: {what} differs from {baseline_plan}"
    expected = run_routing(*_to([u, W, bias], dtype=torch.float64), grad_v.double(), case.iterations, backend="reference",
                           **options)
    for name in expected:
        assert_close_report(actual[name], expected[name], f"{what} B={batch} {name}", dtype=torch.float32)


@pytest.mark.parametrize("batch", [37, 128])
def test_staged_inputs_give_the_direct_loads_bits(monkeypatch, batch):
    """The forward's shared-memory ring for W and u (the default on sm_80 and later, whose
    cp.async copies in the background; staging_slots=3 elsewhere) against the direct loads
    (staging_slots=0). On the GPU the copies really are asynchronous, which the emulator
    cannot show: a missing wait would read a slot before its copies landed."""
    assert_plans_give_the_same_bits(monkeypatch, batch, "staging_slots=0", "staging_slots=3", "the forward's ring",
                                    return_couplings=True)


@pytest.mark.parametrize("batch", [37, 128])
def test_the_sweeps_ring_gives_the_direct_loads_bits(monkeypatch, batch):
    """sweep_staging_slots=3 (the default on sm_80 and later where it fits): the backward
    sweep's passes read W and u through their own ring, in blocks past 48 KiB (the launcher's
    opt-in), against their direct loads (sweep_staging_slots=0); a missing wait or opt-in
    shows only on a GPU."""
    assert_plans_give_the_same_bits(monkeypatch, batch, "sweep_staging_slots=0", "sweep_staging_slots=3", "the sweep's ring")


@pytest.mark.parametrize("batch", [37, 128, 300])
def test_gradient_loads_ahead_give_the_loads_at_use_bits(monkeypatch, batch):
    """The default gradient kernel loads its product terms two at a time and copies the
    next round's u rows into shared memory (cp.async), against the kernel that loads each
    where it uses it (gradient_loads_ahead=0). On the GPU the copies really are
    asynchronous: a missing wait would read u before it landed."""
    assert_plans_give_the_same_bits(monkeypatch, batch, "gradient_loads_ahead=0", "", "the gradient's loads ahead")


@pytest.mark.parametrize("batch", [37, 128])
def test_narrow_gradient_rows_give_the_wide_kernels_bits(monkeypatch, batch):
    """The default gradient kernel (4 rows of W[i, j] per thread, a round's dL/du_hat loads in
    flight together) against gradient_rows=8: every output but dL/du bitwise the same, dL/du
    the same bits on every call, and all of them close to the reference."""
    case = capsnet_case(batch)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device="cuda")
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "gradient_rows=8")
    wide = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    monkeypatch.setenv("CAPSNET_CUDA_PLAN", "")
    narrow = [run_routing(u, W, bias, grad_v, case.iterations, backend="fused") for _ in range(3)]
    for name in wide:
        for again in narrow:
            assert torch.equal(again[name], narrow[0][name]), f"B={batch} {name}: differs between calls"
        if name != "grad_u":
            assert torch.equal(narrow[0][name], wide[name]), f"B={batch} {name}: 4 rows differ from 8"
    expected = run_routing(*_to([u, W, bias], dtype=torch.float64), grad_v.double(), case.iterations, backend="reference")
    for name in expected:
        assert_close_report(narrow[0][name], expected[name], f"narrow B={batch} {name}", dtype=torch.float32)


def test_batch_1024():
    case = capsnet_case(1024)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device="cuda")
    actual = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    expected_inputs = _to([u, W, bias], dtype=torch.float64)
    expected = run_routing(*expected_inputs, grad_v.double(), case.iterations, backend="reference")
    for name in expected:
        assert_close_report(actual[name], expected[name], f"B=1024 {name}", dtype=torch.float32)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_runs_the_kernel_in_float32(half):
    """Half-precision activations and float32 weights, as in an autocast training step."""
    case = capsnet_case(4)
    u32, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device="cuda")
    u = u32.detach().to(half).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused kernel runs: no fallback warning
        with torch.autocast("cuda", dtype=half):
            v = dynamic_routing(u, W, bias, case.iterations)
    assert v.dtype == torch.float32
    grad_u, grad_W, grad_bias = torch.autograd.grad(v, (u, W, bias), grad_v)
    assert grad_u.dtype == half and grad_W.dtype == torch.float32
    # Exactly the float32 op on the rounded inputs: the only loss is the inputs' rounding.
    expected = run_routing(u.detach().float().requires_grad_(), W, bias, grad_v, case.iterations, backend="fused")
    assert torch.equal(v.detach(), expected["v"])
    assert torch.equal(grad_W, expected["grad_W"]) and torch.equal(grad_bias, expected["grad_bias"])
    assert torch.equal(grad_u, expected["grad_u"].to(half))


def test_non_default_stream():
    case = capsnet_case(16)
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device="cuda")
    expected = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        actual = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_gpu():
    case = CAPSNET_TILE
    u, W, bias, grad_v = make_inputs(case, dtype=torch.float32, device="cuda:1")
    actual = run_routing(u, W, bias, grad_v, case.iterations, backend="fused")
    assert all(t.device == torch.device("cuda:1") for t in actual.values())
    expected = run_routing(*_to([u, W, bias], device="cuda:0"), grad_v.to("cuda:0"), case.iterations, backend="fused")
    for name in expected:
        assert torch.equal(actual[name].cpu(), expected[name].cpu()), name


def test_non_contiguous_and_misaligned_inputs():
    u, W, bias, grad_v = make_inputs(CAPSNET_TILE, dtype=torch.float32, device="cuda", requires_grad=False)
    expected = torch.ops.capsnet.routing_forward(u, W, bias, None, 3, False, False, True)
    u_strided = u.transpose(0, 1).contiguous().transpose(0, 1)
    # Contiguous but one float into its storage: not 16-byte aligned, as the CapsNet tile's
    # vector loads need (the launcher copies it).
    W_misaligned = torch.empty(W.numel() + 1, device="cuda")[1:].view_as(W).copy_(W)
    actual = torch.ops.capsnet.routing_forward(u_strided, W_misaligned, bias, None, 3, False, False, True)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_empty_batch():
    u, W, bias, _ = make_inputs(RoutingCase(0, 6, 3, 4, 8), dtype=torch.float32, device="cuda")
    v = dynamic_routing(u, W, bias, 3, backend="fused")
    assert v.shape == (0, 3, 4)
    grad_W, grad_bias = torch.autograd.grad(v.sum(), (W, bias), allow_unused=True)
    assert grad_W is None or torch.equal(grad_W, torch.zeros_like(W))


def test_unsupported_shape_names_the_limit():
    u, W, bias, _ = make_inputs(RoutingCase(1, 2, 3, 33, 4), dtype=torch.float32, device="cuda", requires_grad=False)
    with pytest.raises(RuntimeError, match=r"D_out <= 32, got D_out = 33"):
        torch.ops.capsnet.routing_forward(u, W, bias, None, 2, False, False, False)
