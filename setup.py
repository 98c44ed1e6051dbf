"""Build capsnet and its compiled extension ``capsnet._C``.

The C++ (CPU) kernels are always built. The CUDA kernels are built when this torch was
built with CUDA (``torch.version.cuda``) and nvcc is found; no GPU is needed to build.
Environment variables:

    CAPSNET_FORCE_CUDA=1|0     build the CUDA kernels regardless of detection (1) or never (0)
    TORCH_CUDA_ARCH_LIST       GPU architectures; default "7.0;7.5;8.0;9.0+PTX" (V100, T4, A100 and
                               the sm_86/sm_89 cards that run sm_80 code, H100, PTX for newer),
                               less the archs the nvcc found cannot build (nvcc 13 starts at 7.5)
    CAPSNET_CPU_ARCH           unset (default): the CPU kernels are compiled once per instruction
                               set (cpu_variants.py: baseline x86-64-v2, AVX2, AVX-512 on x86-64;
                               the baseline elsewhere) and the best one this CPU runs is chosen
                               at load time, so that one build runs on any CPU. "native": one
                               variant for the build machine's CPU (-march=native), no dispatch.
    CAPSNET_CPU_VARIANTS       a comma-separated subset of the variants to build (development).

Package metadata is in pyproject.toml. Build without isolation, in an environment that has
torch (``pip install --no-build-isolation .`` or ``-e .``): the extension must be compiled
against the torch that will import it, so torch is not a build requirement, and pip's default
isolated build environment has no torch; this script then stops at once and says so.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

MIN_TORCH = (2, 11)
TORCH_MISSING = """capsnet: cannot build: torch is not importable in this build environment.

capsnet compiles a C++/CUDA extension against the torch that will import it, so torch is not
a build requirement that pip could install into its isolated build environment (an isolated
`pip install .` has no torch, even when your environment has one). Install torch first, then
build without isolation:

    pip install torch                       # or the CUDA/CPU build you want, see pytorch.org
    pip install --no-build-isolation .      # or: pip install --no-build-isolation -e .
"""


def _require_torch() -> None:
    """Stop with instructions, before anything else, when torch cannot be imported."""
    if importlib.util.find_spec("torch") is None:
        raise SystemExit(TORCH_MISSING)


_require_torch()

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "7.0;7.5;8.0;9.0+PTX"
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
from setuptools import setup  # noqa: E402
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


def _relative(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


# ---------------------------------------------------------------------------------------
# CPU kernel variants: csrc/cpu/kernels/routing_kernels.cpp is compiled once per
# instruction set, each time with its own -march and -DCAPSNET_CPU_VARIANT=<name> (which
# puts its code into the namespace capsnet::cpu::<name>), and linked into capsnet._C; the
# driver (csrc/cpu/kernel_dispatch.cpp) picks one at run time from the CPU's features.
# ---------------------------------------------------------------------------------------
KERNEL_VARIANT_SOURCE = os.path.join("csrc", "cpu", "kernels", "routing_kernels.cpp")
# Lowest first. Only -march differs; -mtune=generic so that no variant is tuned for the
# build machine.
X86_64_KERNEL_VARIANTS = {
    "baseline": ["-march=x86-64-v2", "-mtune=generic"],
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
    "avx512": ["-march=x86-64-v4", "-mtune=generic"],
}
# -ffp-contract=off: the kernels write every fused multiply-add explicitly (kernels/vec.h);
# the compiler may not fuse others, whose rounding would then depend on its choices.
# -fno-math-errno: sqrt becomes an instruction. -fvisibility=hidden: nothing of a variant
# is exported. -Wno-psabi: GCC notes on passing vector types, irrelevant inside one object.
# -Wno-unknown-pragmas: routing_math.h unrolls for nvcc with "#pragma unroll".
KERNEL_VARIANT_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden", "-Wno-psabi", "-Wno-unknown-pragmas"]


def cpu_kernel_variants() -> dict[str, list[str]]:
    """The CPU kernel variants to build: name -> its compiler flags, lowest first."""
    arch = os.environ.get("CAPSNET_CPU_ARCH", "")
    if arch == "native":
        return {"native": ["-march=native"]}
    if arch:
        raise SystemExit(
            f"CAPSNET_CPU_ARCH must be unset (kernels for every instruction set, chosen at run time) "
            f"or 'native' (one kernel for this machine's CPU), got {arch!r}"
        )
    if platform.machine().lower() in ("x86_64", "amd64"):
        variants = dict(X86_64_KERNEL_VARIANTS)
    else:
        variants = {"baseline": []}  # the compiler's default for the architecture
    subset = os.environ.get("CAPSNET_CPU_VARIANTS", "")
    if subset:
        names = [name.strip() for name in subset.split(",") if name.strip()]
        unknown = [name for name in names if name not in variants]
        if unknown:
            raise SystemExit(f"CAPSNET_CPU_VARIANTS: unknown variants {unknown}; this machine's are {list(variants)}")
        variants = {name: flags for name, flags in variants.items() if name in names}
    return variants


def check_kernel_object(path: str, variant: str) -> None:
    """Fail the build if a variant's object could run its code on a CPU it was not built for.

    Every symbol it defines for the linker must be in capsnet::cpu::<variant>: a shared
    one (say an inline function of a library header, emitted as a weak symbol) might be
    the copy the linker keeps for the whole library, and then code compiled for AVX-512
    would run wherever that function is called. And it must have no static initialiser,
    which would run at import, before the CPU is checked.
    """
    nm = shutil.which("nm")
    if nm is None:
        print(f"capsnet: nm not found, the symbols of the {variant} CPU kernels are not checked")
        return
    listing = subprocess.run([nm, "--defined-only", path], check=True, capture_output=True, text=True).stdout
    # Mangled names in capsnet::cpu::<variant> (functions, const member functions, data), and
    # local entities of its functions (_ZZ: e.g. a lambda's operator()).
    scope = f"7capsnet3cpu{len(variant)}{variant}"
    allowed = (f"_ZN{scope}", f"_ZNK{scope}", f"_ZZN{scope}", f"_ZZNK{scope}")
    problems = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        kind, name = parts[1], parts[2]
        if name.startswith("_GLOBAL__sub_I"):
            problems.append(f"static initialiser {name}")
        elif (kind.isupper() or kind in "uvw") and not name.startswith(allowed):
            problems.append(f"{kind} {name}")
    if problems:
        raise SystemExit(
            f"capsnet: the {variant} CPU kernel object {path} defines symbols outside capsnet::cpu::{variant} "
            "or runs code at load time (see check_kernel_object in setup.py; c++filt demangles):\n  "
            + "\n  ".join(problems)
        )


class BuildExtensionWithCpuVariants(BuildExtension):
    """torch's BuildExtension, plus one object per CPU kernel variant with its own flags."""

    def finalize_options(self):
        super().finalize_options()
        # An editable install (pip install -e ., make install) builds in a new temporary
        # folder each time, so every rebuild would compile everything again: minutes of
        # nvcc. A folder of the checkout keeps the objects between builds, and ninja
        # compiles only what changed (its depfiles cover the headers, its log the flags),
        # and resumes a build that was stopped.
        if getattr(self, "editable_mode", False):
            self.build_temp = os.path.join(ROOT, "build", f"editable-{sys.implementation.cache_tag}")

    def build_extension(self, ext):
        variants = getattr(ext, "cpu_kernel_variants", {})
        # The -D flags BuildExtension added (TORCH_EXTENSION_NAME, ...), for the same view of
        # the headers.
        defines = [flag for flag in ext.extra_compile_args["cxx"] if flag.startswith("-D")]
        objects = []
        for name, flags in variants.items():
            compiled = self.compiler.compile(
                [KERNEL_VARIANT_SOURCE],
                output_dir=os.path.join(self.build_temp, "cpu_kernels", name),
                macros=[("CAPSNET_CPU_VARIANT", name)],
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": defines + KERNEL_VARIANT_FLAGS + flags, "nvcc": []},
                depends=ext.depends,
            )
            for path in compiled:
                check_kernel_object(path, name)
            objects += compiled
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def build_extension():
    with_cuda, why = _cuda_decision()
    csrc = os.path.join(ROOT, "csrc")
    sources = _relative(
        glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
    )
    variants = cpu_kernel_variants()
    # -fopenmp: at::parallel_for only runs in parallel in code compiled with OpenMP (torch
    # links the same libgomp). No -march here: the driver and everything that runs at
    # import must run on any CPU of the architecture. -Wno-unknown-pragmas: as for the
    # variants (routing_math.h reaches the driver too); a Python built with -Wall warns else.
    extra_compile_args = {"cxx": ["-O3", "-fno-math-errno", "-fopenmp", "-Wno-unknown-pragmas"]}
    define_macros = [(f"CAPSNET_CPU_KERNEL_{name.upper()}", None) for name in variants]
    extension_class = CppExtension
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list(_find_nvcc())
        sources += _relative(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        # -fmad=false: no multiply-add is fused unless the source says so (the kernels write
        # theirs with fma()), so that the backward recomputes the forward's couplings bit for
        # bit whatever each kernel's surroundings (docs/CUDA.md).
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-fmad=false"]
        define_macros.append(("CAPSNET_WITH_CUDA", None))
        # Reported by capsnet.build_info(), and checked against the GPU at run time
        # (capsnet/_extension.py, cuda_device_problem). C++ only: nvcc need not parse a quoted -D.
        extra_compile_args["cxx"].append(f'-DCAPSNET_CUDA_ARCH_LIST="{os.environ["TORCH_CUDA_ARCH_LIST"]}"')
        extension_class = CUDAExtension
    print(
        f"capsnet: building capsnet._C with CUDA {'ON' if with_cuda else 'OFF'} ({why})"
        + (f", TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else "")
        + "; CPU kernel variants: "
        + ", ".join(f"{name} ({' '.join(flags) or 'compiler default'})" for name, flags in variants.items())
        + f"; sources: {', '.join(sources)}",
        flush=True,
    )
    extension = extension_class(
        "capsnet._C",
        sources,
        include_dirs=[csrc],
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
        depends=_relative(
            glob.glob(os.path.join(csrc, "**", "*.h"), recursive=True)
            + glob.glob(os.path.join(csrc, "**", "*.cuh"), recursive=True)
        ),
    )
    extension.cpu_kernel_variants = variants
    return extension


def _torch_requirement() -> str:
    """The torch release series this build links against: the extension's C++ ABI is tied to it."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    if (major, minor) < MIN_TORCH:
        raise SystemExit(
            f"capsnet needs torch >= {'.'.join(map(str, MIN_TORCH))} to build, found torch {torch.__version__}"
        )
    return f"torch=={major}.{minor}.*"


# Metadata (name, version, description, licence, extras) is in pyproject.toml; the
# dependencies are set here because the torch pin depends on the torch found at build time.
setup(
    install_requires=[_torch_requirement()],  # the core package needs torch only
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExtensionWithCpuVariants.with_options(use_ninja=True)},
)
