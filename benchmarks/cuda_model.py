"""Static performance model of the CUDA routing kernels: what the compiled code would cost on a GPU.

    python -m benchmarks.cuda_model                       # sm_90 (H100 SXM), B=128, float32, CapsNet shape
    python -m benchmarks.cuda_model --arch sm_80 --batch 512
    python -m benchmarks.cuda_model --check               # CI resource check (exit 1 on failure)

What it does, step by step:

1. Compiles the kernels (``csrc/cuda/routing_forward.cuh``, ``routing_backward.cuh``) for one
   architecture with nvcc, every instantiation the launch order of the chosen call uses, with
   ``-lineinfo``; reads registers, spills, shared memory and barriers from ``ptxas -v``.
2. Disassembles the cubin (nvdisasm) and classifies every SASS instruction: FFMA (and FMUL/
   FADD), DFMA, integer/address arithmetic, global loads/stores (with their width), shared
   loads/stores, barriers, local memory (spills), special functions, control.
3. Finds the loops (a branch back to an earlier address) and gives each its trip count: the
   source line of the back edge carries a comment ``// model-loop: <expression>`` whose
   expression is evaluated with the launch plan's numbers (``inputs_per_chunk``, ``num_out``,
   ...); ``// model-loop: <expression>; unroll U`` marks a loop written with
   ``#pragma unroll U``. Other run-time loops carry ``#pragma unroll 1``, so that the compiled
   loop is the source loop. An unrolled loop runs ``trips // U`` times, and its remainder
   loop (the next loop on the same line, if any) ``trips % U``; without a declared U, U is
   guessed from the ratio of the two bodies' loads and arithmetic. An instruction's weight is the product of the trip
   counts of the loops around it; the sum of the weights is the instructions one warp issues.
   Branches are counted as taken both ways (an upper bound) except the work the kernels
   select at compile time (``kFirst``, ``SweepPass``).
4. Takes the launch plan and the launch order from the code that launches the kernels (the
   CPU emulation module, ``benchmarks/emulator.py``, runs the real planner ``routing_launch.h``
   and the real launch order ``routing_host.h``).
5. Per launch: blocks per SM from the real register count, shared memory, threads and the
   per-SM limits; the busiest SM gets ceil(blocks / SMs) blocks; it issues
   ``blocks x warps per block x instructions per warp`` warp-instructions at 4 per clock (one
   per scheduler), or proportionally fewer when fewer than 2 warps per scheduler are
   resident; float64 FMAs issue at half rate. Time = cycles / clock + a fixed launch gap.

Assumptions (stated, not measured): issue-limited kernels, that is, the working set (W, u,
the workspaces: 40 MB at B=128) is served from the 50 MB L2 fast enough, memory latency is
hidden by the resident warps and by independent instructions, barriers cost nothing beyond
their issue slot; clock 1.98 GHz (H100 SXM boost) or 1.41 GHz (A100); 1 us between dependent
launches in one stream. The last line is ``<arch> B=<batch> fwd+bwd estimate: <N> us``.
Measured GPU times go beside the estimates in docs/CUDA.md (``make gpu-check`` prints both).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"

CAPSNET_SHAPE = dict(num_in=1152, num_out=10, dim_out=16, dim_in=8)


@dataclass(frozen=True)
class Gpu:
    name: str
    multiprocessors: int
    clock_ghz: float
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_bytes_per_sm: int = 228 * 1024
    shared_reserved_per_block: int = 1024
    launch_gap_us: float = 1.0


GPUS = {
    "sm_90": Gpu("H100 SXM", 132, 1.98),
    "sm_80": Gpu("A100 SXM", 108, 1.41, shared_bytes_per_sm=164 * 1024),
    "sm_75": Gpu("T4", 40, 1.59, max_warps_per_sm=32, max_blocks_per_sm=16, shared_bytes_per_sm=64 * 1024),
}

DTYPES = {"float32": ("float", 4), "float64": ("double", 8), "float16": ("c10::Half", 4), "bfloat16": ("c10::BFloat16", 4)}


# ---------------------------------------------------------------------------------------
# Tools.
# ---------------------------------------------------------------------------------------
def find_tool(name: str) -> str:
    candidates = []
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", name))
    candidates.append(shutil.which(name) or "")
    try:  # triton ships nvdisasm and cuobjdump with torch's CUDA wheels
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            return candidate
    raise SystemExit(f"cuda_model: {name} not found (set CUDA_HOME; tried {candidates})")


def torch_include() -> str:
    import torch.utils.cpp_extension

    return torch.utils.cpp_extension.include_paths()[0]


# ---------------------------------------------------------------------------------------
# Compile and read the compiler's output.
# ---------------------------------------------------------------------------------------
@dataclass
class Resources:
    registers: int = 0
    spill_bytes: int = 0  # stores + loads
    static_shared: int = 0
    barriers: int = 0


def instantiation_source(instantiations: list[str]) -> str:
    lines = ['#include "cuda/routing_backward.cuh"', "namespace capsnet::cuda {"]
    lines += [f"template __global__ void {name};" for name in instantiations]
    lines.append("}")
    return "\n".join(lines) + "\n"


_compiled: dict[tuple, tuple[dict, str]] = {}


def compile_kernels(source_text: str, arch: str, workdir: str, include_dir: pathlib.Path = CSRC) -> tuple[dict, str]:
    """Compiles `source_text` (explicit instantiations); returns ({mangled name: Resources},
    SASS text with line info). Remembered per process: the resource check costs several
    plans of the same kernels."""
    key = (source_text, arch, str(include_dir))
    if key not in _compiled:
        _compiled[key] = _compile(source_text, arch, workdir, include_dir)
    return _compiled[key]


def _compile(source_text: str, arch: str, workdir: str, include_dir: pathlib.Path) -> tuple[dict, str]:
    source = os.path.join(workdir, "kernels.cu")
    cubin = os.path.join(workdir, "kernels.cubin")
    with open(source, "w") as f:
        f.write(source_text)
    command = [
        # The flags of setup.py's CUDA build.
        find_tool("nvcc"), "-cubin", f"-arch={arch}", "-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-fmad=false",
        "-Xptxas", "-v", f"-I{include_dir}", f"-I{torch_include()}", "-o", cubin, source,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"cuda_model: nvcc failed:\n{result.stderr[-4000:]}")
    resources: dict[str, Resources] = {}
    current = None
    for line in result.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = resources.setdefault(m.group(1), Resources())
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.spill_bytes = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            current.barriers = int(b.group(1)) if b else 0
            s = re.search(r"(\d+) bytes smem", line)
            current.static_shared = int(s.group(1)) if s else 0
    sass = subprocess.run([find_tool("nvdisasm"), "-g", "-c", cubin], capture_output=True, text=True, check=True).stdout
    return resources, sass


@dataclass
class Instruction:
    opcode: str
    text: str
    location: tuple[str, int] | None


def parse_sass(sass: str) -> dict[str, tuple[list[Instruction], dict[str, int]]]:
    functions = {}
    parts = re.split(r"\n\s*\.text\.(\S+):\n", sass)
    for k in range(1, len(parts), 2):
        location = None
        instructions: list[Instruction] = []
        labels: dict[str, int] = {}
        for raw in parts[k + 1].split("\n"):
            m = re.match(r'\s*//## File "([^"]+)", line (\d+)', raw)
            if m:
                location = (os.path.basename(m.group(1)), int(m.group(2)))
                continue
            m = re.match(r"^\s*\.(L_x_\d+):", raw)
            if m:
                labels[m.group(1)] = len(instructions)
                continue
            m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", raw)
            if m:
                text = m.group(1)
                body = re.sub(r"^@!?U?P\w+\s+", "", text)
                instructions.append(Instruction(body.split()[0] if body else "", text, location))
        functions[parts[k]] = (instructions, labels)
    return functions


def instruction_class(instruction: Instruction) -> str:
    op = instruction.opcode
    base = op.split(".")[0]
    if base in ("FFMA", "FFMA2"):
        return "ffma"
    if base in ("FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FCHK", "FSET"):
        return "fp32 other"
    if base in ("DFMA", "DMUL", "DADD", "DSETP", "DMNMX"):
        return "fp64"
    if base in ("LDG", "LD", "LDC", "ULDC"):
        if base in ("LDC", "ULDC"):
            return "constant"
        return "ldg.128" if ".128" in op else "ldg"
    if base in ("STG", "ST", "RED", "ATOM", "ATOMG"):
        return "stg"
    if base == "LDS":
        return "lds"
    if base == "STS":
        return "sts"
    if base in ("LDL", "STL"):
        return "local"
    if base in ("BAR", "BSYNC", "BSSY", "WARPSYNC"):
        return "barrier" if base == "BAR" else "control"
    if base in ("BRA", "EXIT", "RET", "CALL", "JMP", "BRX", "NOP", "YIELD"):
        return "control"
    if base == "MUFU":
        return "mufu"
    if base in ("F2F", "F2I", "I2F", "HADD2", "HMUL2", "HFMA2", "PRMT", "F2FP"):
        return "convert"
    return "integer"


@dataclass
class Loop:
    start: int
    end: int
    location: tuple[str, int] | None
    trips: float = 1.0


def source_markers(root: pathlib.Path = CSRC) -> dict[tuple[str, int], str]:
    """{(file name, line): trip-count expression} from the '// model-loop:' comments, and
    {(file name, line): COLD} for the lines between '// model-cold-begin' and
    '// model-cold-end' (rare branches, such as the squash's rescaling for huge or tiny |s|,
    counted as not taken)."""
    markers = {}
    for path in list((root / "cuda").glob("*.cuh")) + [root / "routing_math.h"]:
        cold = False
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            m = re.search(r"//\s*model-loop:\s*(.+?)\s*$", line)
            if m:
                markers[(path.name, number)] = m.group(1)
            if "model-cold-begin" in line:
                cold = True
            if "model-cold-end" in line:
                cold = False
            if cold:
                markers[(path.name, number)] = COLD
    return markers


COLD = "<cold>"


def body_signature(instructions: list[Instruction], start: int, end: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ins in instructions[start : end + 1]:
        cls = instruction_class(ins)
        if cls not in ("control", "integer"):
            counts[cls] = counts.get(cls, 0) + 1
    return counts


def loop_weights(
    name: str, instructions: list[Instruction], labels: dict[str, int], env: dict, markers: dict
) -> list[float]:
    """Per instruction: how many times one warp issues it."""
    loops: list[Loop] = []
    for index, ins in enumerate(instructions):
        m = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", ins.text)
        if not m or ins.opcode.split(".")[0] != "BRA":
            continue
        target = labels.get(m.group(1))
        if target is None or target > index or (target == index and not ins.text.startswith("@")):
            continue  # a forward branch, or the trap loop after EXIT
        loops.append(Loop(target, index, ins.location))
    # Trip counts from the markers; an unrolled loop is a main loop and a remainder loop
    # with the same back-edge line, one after the other.
    assigned: set[int] = set()
    for k, loop in enumerate(loops):
        if k in assigned:
            continue
        expression = markers.get(loop.location) if loop.location else None
        if expression is None:
            raise SystemExit(
                f"cuda_model: {name}: loop at {loop.location} has no '// model-loop: <trips>' comment in the source"
            )
        declared_unroll = None
        if expression != COLD and ";" in expression:  # "<trips>; unroll <U>": a #pragma unroll U loop
            expression, _, clause = expression.partition(";")
            declared_unroll = int(clause.split()[-1])
        if expression == COLD:
            trips = 0.0
        else:
            trips = float(eval(expression, {"ceil": math.ceil, "min": min, "max": max}, dict(env)))  # noqa: S307
        later = loops[k + 1] if k + 1 < len(loops) else None
        if later is not None and later.location == loop.location and later.start > loop.end:
            if declared_unroll is not None:
                unroll = declared_unroll
            else:
                main = body_signature(instructions, loop.start, loop.end)
                rest = body_signature(instructions, later.start, later.end)
                common = [c for c in rest if c in main]
                unroll = max(1, round(main[common[0]] / rest[common[0]])) if common else 1
            loop.trips = float(trips // unroll)
            later.trips = float(trips % unroll)
            assigned.add(k + 1)
        else:
            # Without a remainder loop the leftover iterations are peeled outside the loop,
            # where they are counted once.
            loop.trips = float(trips // declared_unroll) if declared_unroll else trips
    weights = [0.0 if markers.get(ins.location) == COLD else 1.0 for ins in instructions]
    for loop in loops:
        for index in range(loop.start, loop.end + 1):
            weights[index] *= loop.trips
    return weights


# ---------------------------------------------------------------------------------------
# The plan, the launches, the estimate.
# ---------------------------------------------------------------------------------------
def plan_and_launches(batch: int, shape: dict, iterations: int, acc_bytes: int, sms: int, detach: bool):
    """(plan dict, [(launch text, plan key)]) from the emulator module: the real planner and
    launch order."""
    import torch

    from benchmarks import emulator

    simt = emulator.load()
    plan = simt.describe_plan(
        batch, shape["num_in"], shape["num_out"], shape["dim_out"], shape["dim_in"], iterations, acc_bytes, sms,
        False, detach,
    )
    # The launch order depends on r and the options only: run a tiny call of the same kind.
    tiny = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, shape["dim_in"], generator=tiny)
    W = torch.randn(2, shape["num_out"], shape["dim_out"], shape["dim_in"], generator=tiny)
    simt.clear_launch_log()
    _, s_saved, _ = simt.routing_forward(u, W, None, None, iterations, False, detach, False)
    forward_count = len(simt.full_launch_log())
    simt.routing_backward(torch.randn(1, shape["num_out"], shape["dim_out"]), u, W, None, s_saved, False, detach)
    launches = list(simt.full_launch_log())
    return plan, launches[:forward_count], launches[forward_count:]


def instantiation_of(launch: str, scalar: str, tile: str) -> str:
    """'forward_partial_sums_kernel<scalar_t, Tile, true>' -> explicit instantiation declaration."""
    name, _, arguments = launch.partition("<")
    arguments = arguments.rstrip(">").replace("scalar_t", scalar).replace("Tile", tile).replace("SweepPass::", "capsnet::cuda::SweepPass::")
    params = "PriorParams" if name.startswith("prior") else ("ForwardParams" if name.startswith("forward") else "BackwardParams")
    return f"{name}<{arguments}>(const {params}<{scalar}>)"


def mangled_match(mangled: dict, instantiation: str):
    name = instantiation.split("<")[0]
    arguments = instantiation.split("<", 1)[1]
    flags = []
    if "true" in arguments:
        flags.append("Lb1E")
    if "false" in arguments:
        flags.append("Lb0E")
    for code, enum_value in enumerate(("kLogitGrads", "kPriorGrads", "kCouplingsOnly")):
        if enum_value in arguments:
            flags.append(f"SweepPassE{code}E")
    candidates = [m for m in mangled if f"{len(name)}{name}" in m and all(f in m for f in flags)]
    if len(candidates) != 1:
        raise SystemExit(f"cuda_model: cannot find {instantiation} among {list(mangled)}")
    return candidates[0]


@dataclass
class KernelEstimate:
    kernel: str
    launches: int = 0
    registers: int = 0
    spill_bytes: int = 0
    blocks: int = 0
    blocks_per_sm: int = 0
    waves: float = 0.0
    warp_instructions: float = 0.0
    classes: dict = field(default_factory=dict)
    microseconds: float = 0.0


def blocks_per_sm(gpu: Gpu, registers: int, threads: int, shared: int) -> int:
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = gpu.registers_per_sm // (regs_per_warp * warps)
    by_warps = gpu.max_warps_per_sm // warps
    by_shared = gpu.shared_bytes_per_sm // (shared + gpu.shared_reserved_per_block) if shared else gpu.max_blocks_per_sm
    return max(0, min(by_regs, by_warps, by_shared, gpu.max_blocks_per_sm))


@dataclass
class LaunchCost:
    blocks: int
    warps: int  # per block
    resident: int  # blocks per SM
    per_warp: float  # warp-instructions one warp issues
    microseconds: float


def cost_of_launch(gpu: Gpu, res: Resources, classes: dict, config: dict) -> LaunchCost:
    """The issue-limited time of one launch (the module docstring gives the arithmetic)."""
    blocks = math.prod(config["grid"])
    threads = math.prod(config["block"])
    warps = math.ceil(threads / 32)
    resident = blocks_per_sm(gpu, res.registers, threads, config["shared_bytes"] + res.static_shared)
    if resident == 0:
        raise SystemExit(f"cuda_model: a launch with {threads} threads and {res.registers} registers cannot run")
    busiest = math.ceil(blocks / gpu.multiprocessors)
    concurrent = min(resident, busiest)
    efficiency = min(1.0, concurrent * warps / 4 / 2)  # 2 warps per scheduler hide dependent issue
    per_warp = sum(classes.values())
    cycles = busiest * warps * (per_warp + classes.get("fp64", 0.0)) / (4 * efficiency)
    return LaunchCost(blocks, warps, resident, per_warp, cycles / (gpu.clock_ghz * 1e3) + gpu.launch_gap_us)


def estimate(args) -> tuple[list[KernelEstimate], list[KernelEstimate], dict, dict]:
    gpu = GPUS[args.arch]
    scalar, acc_bytes = DTYPES[args.dtype]
    plan, forward, backward = plan_and_launches(
        args.batch, CAPSNET_SHAPE, args.iterations, acc_bytes, gpu.multiprocessors, args.detach_routing
    )
    tile = plan["tile"]
    instantiations = sorted({instantiation_of(launch, scalar, tile) for launch in forward + backward})
    with tempfile.TemporaryDirectory() as workdir:
        resources, sass = compile_kernels(instantiation_source(instantiations), args.arch, workdir)
    functions = parse_sass(sass)
    shape = dict(CAPSNET_SHAPE, batch=args.batch, iterations=args.iterations)
    env = dict(
        batch=args.batch, num_in=shape["num_in"], num_out=shape["num_out"], dim_out=shape["dim_out"],
        dim_in=shape["dim_in"], iterations=args.iterations, inputs_per_chunk=plan["inputs_per_chunk"],
        num_chunks=plan["num_chunks"], terms=plan["terms"], sample_groups=plan["sample_groups"],
        grad_input_slice=plan["grad_input_slice"],
        input_slices=math.ceil(shape["dim_in"] / plan["grad_input_slice"]),
        grad_s_terms=1 if args.detach_routing else args.iterations,
    )
    per_function = {}
    markers = source_markers()
    for mangled, (instructions, labels) in functions.items():
        weights = loop_weights(mangled, instructions, labels, env, markers)
        classes: dict[str, float] = {}
        for ins, weight in zip(instructions, weights):
            cls = instruction_class(ins)
            classes[cls] = classes.get(cls, 0.0) + weight
        per_function[mangled] = classes

    def run(launches):
        rows: dict[str, KernelEstimate] = {}
        for launch in launches:
            name = launch.split("<")[0]
            mangled = mangled_match(resources, instantiation_of(launch, scalar, tile))
            config = plan["launches"][name]
            res = resources[mangled]
            classes = per_function[mangled]
            launch_cost = cost_of_launch(gpu, res, classes, config)
            blocks, resident, per_warp, warps = launch_cost.blocks, launch_cost.resident, launch_cost.per_warp, launch_cost.warps
            key = name + ("<first>" if "true" in launch else "") + (
                "<" + launch.split("SweepPass::")[1].rstrip(">") + ">" if "SweepPass::" in launch else ""
            )
            row = rows.setdefault(key, KernelEstimate(key))
            row.launches += 1
            row.registers, row.spill_bytes = res.registers, res.spill_bytes
            row.blocks, row.blocks_per_sm = blocks, resident
            row.waves = blocks / (resident * gpu.multiprocessors)
            row.warp_instructions += blocks * warps * per_warp
            for cls, count in classes.items():
                row.classes[cls] = row.classes.get(cls, 0.0) + blocks * warps * count
            row.microseconds += launch_cost.microseconds
        return list(rows.values())

    return run(forward), run(backward), plan, resources


def format_table(title: str, rows: list[KernelEstimate]) -> str:
    lines = [
        f"{title}",
        "| kernel | launches | regs | spill B | blocks | blocks/SM | waves | warp-instr (M) | FFMA share | LDG | LDS+STS | BAR | est. us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        total = row.warp_instructions or 1.0
        ffma = row.classes.get("ffma", 0.0) + row.classes.get("fp64", 0.0)
        ldg = row.classes.get("ldg", 0.0) + row.classes.get("ldg.128", 0.0)
        lds = row.classes.get("lds", 0.0) + row.classes.get("sts", 0.0)
        lines.append(
            f"| {row.kernel} | {row.launches} | {row.registers} | {row.spill_bytes} | {row.blocks} | {row.blocks_per_sm} | "
            f"{row.waves:.2f} | {row.warp_instructions / 1e6:.2f} | {ffma / total:.0%} | {ldg / total:.0%} | "
            f"{lds / total:.0%} | {row.classes.get('barrier', 0.0) / total:.1%} | {row.microseconds:.1f} |"
        )
    lines.append(f"| **total** | | | | | | | {sum(r.warp_instructions for r in rows) / 1e6:.2f} | | | | | "
                 f"**{sum(r.microseconds for r in rows):.1f}** |")
    return "\n".join(lines)


def resource_check(arch: str) -> int:
    """CI: zero spills in the float32 CapsNet-tile kernels, and at least one resident block per
    SM for every launch of the CapsNet plan at B in {32, 128, 512, 1024}."""
    failures = []
    for batch in (32, 128, 512, 1024):
        for detach in (False, True):
            args = argparse.Namespace(arch=arch, batch=batch, dtype="float32", iterations=3, detach_routing=detach)
            forward, backward, plan, resources = estimate(args)
            for row in forward + backward:
                if row.spill_bytes:
                    failures.append(f"B={batch}: {row.kernel} spills {row.spill_bytes} bytes")
                if row.blocks_per_sm < 1:
                    failures.append(f"B={batch}: {row.kernel} has no resident block per SM")
            print(f"B={batch} detach_routing={detach}: {len(forward + backward)} kernels, "
                  f"max registers {max(r.registers for r in forward + backward)}, "
                  f"min blocks/SM {min(r.blocks_per_sm for r in forward + backward)}, "
                  f"spill bytes {sum(r.spill_bytes for r in forward + backward)}")
    for failure in failures:
        print("FAIL:", failure)
    print("resource check:", "FAILED" if failures else "passed")
    return 1 if failures else 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="sm_90", choices=sorted(GPUS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--detach-routing", action="store_true", help="the detach_routing backward")
    parser.add_argument("--check", action="store_true", help="CI resource check at B in {32, 128, 512, 1024}")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        return resource_check(args.arch)
    gpu = GPUS[args.arch]
    forward, backward, plan, _ = estimate(args)
    print(f"{gpu.name} ({args.arch}: {gpu.multiprocessors} SMs, {gpu.clock_ghz} GHz), CapsNet shape "
          f"N_in={CAPSNET_SHAPE['num_in']} N_out={CAPSNET_SHAPE['num_out']} D_out={CAPSNET_SHAPE['dim_out']} "
          f"D_in={CAPSNET_SHAPE['dim_in']}, r={args.iterations}, {args.dtype}, B={args.batch}"
          + (", detach_routing" if args.detach_routing else ""))
    print(f"plan: {plan['tile']}, {plan['samples_per_block']} samples x {CAPSNET_SHAPE['num_out']} capsules per block, "
          f"{plan['num_chunks']} chunks of {plan['inputs_per_chunk']} inputs, grad_weight sample groups "
          f"{plan['sample_groups']}\n")
    print(format_table("forward", forward))
    print()
    print(format_table("backward", backward))
    fwd = sum(r.microseconds for r in forward)
    bwd = sum(r.microseconds for r in backward)
    print(f"\nforward {fwd:.1f} us, backward {bwd:.1f} us")
    print(f"{args.arch} B={args.batch} fwd+bwd estimate: {fwd + bwd:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
