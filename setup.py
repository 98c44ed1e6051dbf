"""Build capsnet and its compiled extension ``capsnet._C``.

The C++ (CPU) kernels are always built. The CUDA kernels are built when this torch was
built with CUDA (``torch.version.cuda``) and nvcc is found; no GPU is needed to build.
Environment variables:

    CAPSNET_FORCE_CUDA=1|0     build the CUDA kernels regardless of detection (1) or never (0)
    TORCH_CUDA_ARCH_LIST       GPU architectures; default "7.0;7.5;8.0;9.0+PTX" (V100, T4, A100 and
                               the sm_86/sm_89 cards that run sm_80 code, H100, PTX for newer),
                               less the archs the nvcc found cannot build (nvcc 13 starts at 7.5)
    CAPSNET_CPU_ARCH           -march for the C++ kernels; default "native" (the kernels rely on
                               the compiler vectorising their inner loops). Set it to e.g.
                               "x86-64-v3" when building a binary for other machines, or to ""
                               to use the compiler's default.

Build without isolation (``pip install --no-build-isolation -e .``): the extension must be
compiled against the torch that will import it, and an isolated build would fetch a
different (multi-GB) torch into a throwaway environment.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "7.0;7.5;8.0;9.0+PTX"
# Written at build time; capsnet/_extension.py reads it to check a GPU against the built archs.
CUDA_BUILD_RECORD = os.path.join(ROOT, "capsnet", "_cuda_build.py")
STANDARD_CUDA_HOME = "/usr/local/cuda"


def _default_cuda_home() -> None:
    """Point CUDA_HOME at a toolkit with headers when torch's own guess would not.

    Without CUDA_HOME/CUDA_PATH, torch takes the folder above the `nvcc` on PATH; when that
    nvcc is a wrapper script (e.g. /usr/local/bin/nvcc) the guess, /usr/local, has no CUDA
    headers or libraries and the build fails at link time. Must run before
    torch.utils.cpp_extension is imported: it reads the variable once, at import.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else STANDARD_CUDA_HOME
    has_headers = os.path.exists(os.path.join(guess, "include", "cuda_runtime.h"))
    if not has_headers and os.path.exists(os.path.join(STANDARD_CUDA_HOME, "include", "cuda_runtime.h")):
        os.environ["CUDA_HOME"] = STANDARD_CUDA_HOME
        print(f"capsnet: CUDA_HOME not set and {guess} has no CUDA headers; using {STANDARD_CUDA_HOME}")


_default_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled)
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _env_switch(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _find_nvcc() -> str | None:
    if CUDA_HOME is None:
        return None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    return nvcc if os.path.exists(nvcc) else None


def _cuda_decision() -> tuple[bool, str]:
    forced = _env_switch("CAPSNET_FORCE_CUDA")
    if forced is not None:
        return forced, f"CAPSNET_FORCE_CUDA={int(forced)}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    nvcc = _find_nvcc()
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch.version.cuda={torch.version.cuda}, nvcc at {nvcc}"


def _nvcc_archs(nvcc: str) -> set[str] | None:
    """The virtual archs nvcc can build ("7.5", "8.0", ...), or None if it cannot tell."""
    try:
        listing = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"compute_(\d+)", listing)}
    return archs or None


def _default_arch_list(nvcc: str | None) -> str:
    """DEFAULT_CUDA_ARCH_LIST less what this nvcc cannot build, saying which and why; a '+PTX'
    moves to the newest arch kept."""
    wanted = DEFAULT_CUDA_ARCH_LIST.split(";")
    supported = _nvcc_archs(nvcc) if nvcc else None
    if supported is None:
        return DEFAULT_CUDA_ARCH_LIST
    kept = [entry for entry in wanted if entry.split("+")[0] in supported]
    dropped = [entry.split("+")[0] for entry in wanted if entry.split("+")[0] not in supported]
    if dropped:
        oldest = min(supported, key=lambda a: tuple(int(p) for p in a.split(".")))
        print(
            f"capsnet: not building for compute capability {', '.join(dropped)}: {nvcc} supports "
            f"compute_{oldest.replace('.', '')} and newer only (a CUDA 12 toolkit still builds sm_70)",
            flush=True,
        )
    if kept and not any(entry.endswith("+PTX") for entry in kept) and any(e.endswith("+PTX") for e in wanted):
        kept[-1] += "+PTX"
    if not kept:
        raise SystemExit(f"capsnet: {nvcc} supports none of {DEFAULT_CUDA_ARCH_LIST}; set TORCH_CUDA_ARCH_LIST")
    return ";".join(kept)


def _record_cuda_archs(arch_list: str | None) -> None:
    """capsnet/_cuda_build.py: what the CUDA kernels were built for (None: no CUDA kernels)."""
    entries = None if arch_list is None else [e for e in re.split(r"[;\s]+", arch_list) if e]
    with open(CUDA_BUILD_RECORD, "w") as f:
        f.write('"""Written by setup.py: the TORCH_CUDA_ARCH_LIST capsnet._C was built with."""\n\n')
        f.write(f"CUDA_ARCH_LIST = {tuple(entries)!r}\n" if entries is not None else "CUDA_ARCH_LIST = None\n")


def _relative(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def build_extension():
    with_cuda, why = _cuda_decision()
    csrc = os.path.join(ROOT, "csrc")
    sources = _relative(
        glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
    )
    cpu_arch = os.environ.get("CAPSNET_CPU_ARCH", "native")
    # -fopenmp: at::parallel_for only runs in parallel in code compiled with OpenMP (torch
    # links the same libgomp); the kernels use `omp simd` for their inner loops.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    if cpu_arch:
        cxx_flags.append(f"-march={cpu_arch}")
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []
    extension_class = CppExtension
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list(_find_nvcc())
        sources += _relative(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        define_macros.append(("CAPSNET_WITH_CUDA", None))
        extension_class = CUDAExtension
    _record_cuda_archs(os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None)
    print(
        f"capsnet: building capsnet._C with CUDA {'ON' if with_cuda else 'OFF'} ({why})"
        + (f", TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else "")
        + f", CPU -march={cpu_arch or '(compiler default)'}; sources: {', '.join(sources)}",
        flush=True,
    )
    return extension_class(
        "capsnet._C",
        sources,
        include_dirs=[csrc],
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )


setup(
    name="capsnet",
    version="0.1.0",
    description="Fused dynamic routing between capsules (CPU and CUDA) for PyTorch",
    packages=find_packages(include=["capsnet", "capsnet.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    # train_mnist.py and capsnet.training import these lazily; the op and model do not need them.
    extras_require={"train": ["torchvision", "tqdm", "matplotlib"]},
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
