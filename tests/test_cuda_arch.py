"""Which GPUs the CUDA kernels cover, and what happens on one they do not: decided without a GPU.

setup.py builds the default arch list (7.0;7.5;8.0;9.0+PTX) less what the nvcc found cannot
build and compiles it into the extension (build info); at run time capsnet/_extension.py compares
the device's compute capability with it; capsnet/ops.py then falls back to the reference
with a warning ("auto") or raises ("fused"). The capability is mocked here.
"""

from __future__ import annotations

import ast
import pathlib
import re
import stat
import subprocess
import warnings

import pytest
import torch

from capsnet import _extension, ops

REPO = pathlib.Path(__file__).resolve().parents[1]
BUILT = ("7.5", "8.0", "9.0+PTX")


@pytest.mark.parametrize(
    "capability, covered",
    [
        ((7, 5), True),  # T4: sm_75 code
        ((8, 0), True),  # A100
        ((8, 6), True),  # RTX 30xx, A10: the sm_80 cubin runs on 8.6
        ((8, 9), True),  # L4, RTX 40xx
        ((9, 0), True),  # H100
        ((10, 0), True),  # B200: the driver compiles the 9.0 PTX
        ((12, 0), True),
        ((7, 0), False),  # V100: nothing for it in a CUDA 13 build
        ((6, 1), False),
    ],
)
def test_arch_coverage(capability, covered):
    assert _extension.arch_covers(capability, BUILT) is covered


def test_without_ptx_newer_gpus_are_not_covered():
    assert not _extension.arch_covers((9, 0), ("7.5", "8.0"))
    assert _extension.arch_covers((8, 9), ("7.5", "8.0"))


@pytest.mark.parametrize(
    "archs, capability, covered",
    [
        # 9.0a: Hopper-only instructions, for 9.0 alone (an H200's environment set this list)
        (("9.0a",), (9, 0), True),
        (("9.0a",), (8, 0), False),
        (("9.0a+PTX",), (10, 0), False),  # arch-specific PTX is not forward compatible
        (("8.0", "9.0a"), (8, 6), True),
        # family-specific: the later GPUs of the family (10.3), not the next family
        (("10.0f",), (10, 3), True),
        (("10.0f",), (12, 0), False),
        ((" 9.0 ",), (9, 0), True),
    ],
)
def test_arch_suffixes(archs, capability, covered):
    assert _extension.arch_covers(capability, archs) is covered


@pytest.mark.parametrize("arch_list", ["Hopper", "native", "8.0;Ampere", "9.0b", "sm_90"])
def test_arch_lists_that_are_not_numbers_make_no_claim(monkeypatch, arch_list):
    """torch also takes arch names and "native"; the check does not resolve those, so it stays
    silent rather than refusing a GPU the build may cover."""
    monkeypatch.setitem(_extension._BUILD_INFO, "cuda_arch_list", arch_list)
    assert _extension.compiled_cuda_archs() is None
    assert _extension.arch_problem("NVIDIA H200", (9, 0), _extension.compiled_cuda_archs()) is None


def test_numeric_arch_lists_are_read_whatever_the_separator(monkeypatch):
    monkeypatch.setitem(_extension._BUILD_INFO, "cuda_arch_list", "7.5 8.0;9.0a+PTX")
    assert _extension.compiled_cuda_archs() == ("7.5", "8.0", "9.0a+PTX")


def test_problem_names_the_device_the_archs_and_the_fix():
    problem = _extension.arch_problem("Tesla V100-SXM2-16GB", (7, 0), BUILT)
    assert "Tesla V100-SXM2-16GB" in problem and "7.0" in problem
    assert "7.5;8.0;9.0+PTX" in problem and 'TORCH_CUDA_ARCH_LIST="7.0"' in problem
    assert _extension.arch_problem("NVIDIA H100", (9, 0), BUILT) is None
    assert _extension.arch_problem("any", (7, 0), None) is None  # not recorded: no claim


def test_fused_raises_and_auto_warns_once(monkeypatch):
    problem = _extension.arch_problem("Tesla V100-SXM2-16GB", (7, 0), BUILT)
    monkeypatch.setattr(_extension, "cuda_device_problem", lambda device: problem)
    monkeypatch.setattr(ops, "_warned_devices", set())
    device = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"backend='fused' is unavailable: the GPU 'Tesla V100-SXM2-16GB'"):
        ops._gpu_is_covered("fused", device)
    with pytest.warns(UserWarning, match=r"Tesla V100.*7\.5;8\.0;9\.0\+PTX.*reference"):
        assert ops._gpu_is_covered("auto", device) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per GPU
        assert ops._gpu_is_covered("auto", device) is False
    monkeypatch.setattr(_extension, "cuda_device_problem", lambda device: None)
    assert ops._gpu_is_covered("fused", device) is True


def _setup_functions(*names):
    """The named functions of setup.py (and its default arch list), without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    wanted = [
        node for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name in names)
        or (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DEFAULT_CUDA_ARCH_LIST" for t in node.targets))
    ]
    namespace = {"re": re, "subprocess": subprocess}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "setup.py", "exec"), namespace)  # noqa: S102
    return namespace


def _fake_nvcc(folder, archs):
    folder.mkdir()
    nvcc = folder / "nvcc"
    nvcc.write_text("#!/bin/sh\n" + "".join(f"echo compute_{a}\n" for a in archs))
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(nvcc)


def test_default_arch_list_follows_the_toolkit(tmp_path, capsys):
    default_arch_list = _setup_functions("_nvcc_archs", "_default_arch_list")["_default_arch_list"]
    cuda12 = _fake_nvcc(tmp_path / "cuda12", ["50", "60", "70", "75", "80", "86", "89", "90"])
    assert default_arch_list(cuda12) == "7.0;7.5;8.0;9.0+PTX"
    assert "not building" not in capsys.readouterr().out
    cuda13 = _fake_nvcc(tmp_path / "cuda13", ["75", "80", "86", "89", "90", "100", "120"])
    assert default_arch_list(cuda13) == "7.5;8.0;9.0+PTX"
    assert "not building for compute capability 7.0" in capsys.readouterr().out
