"""Static performance model of the CUDA routing kernels: what the compiled code would cost on a GPU.

    python -m benchmarks.cuda_model                       # sm_90 (H100 SXM), B=128, float32, CapsNet shape
    python -m benchmarks.cuda_model --arch sm_80 --batch 512
    python -m benchmarks.cuda_model --check               # CI resource check (exit 1 on failure)
    python -m benchmarks.cuda_model --lines kLater        # also: where a kernel's instructions come from

What it does, step by step:

1. Compiles the kernels (``csrc/cuda/routing_forward.cuh``, ``routing_backward.cuh``,
   ``routing_gradients.cuh``) for one architecture with nvcc, every instantiation the launch
   order of the chosen call uses, with ``-lineinfo``; reads registers, spills, shared memory
   and barriers from ``ptxas -v``.
2. Disassembles the cubin (nvdisasm, with the chain of inlined calls of every instruction)
   and classifies every SASS instruction: FFMA, other FP32 arithmetic, FP32 comparisons,
   FP64, integer/address, uniform-datapath, global loads/stores (with their width), shared
   loads/stores, barriers, local memory (spills), special functions, conversions, control.
3. Finds the loops (a branch back to an earlier address) and gives each its trip count: the
   source line of the back edge carries a comment ``// model-loop: <expression>`` whose
   expression is evaluated with the launch plan's numbers (``inputs_per_chunk``, ``num_out``,
   ...); ``// model-loop: <expression>; unroll U`` marks a loop written with
   ``#pragma unroll U``. Other run-time loops carry ``#pragma unroll 1``, so that the compiled
   loop is the source loop (each copy of it, where an enclosing loop is unrolled, runs the
   full trips). An unrolled loop runs ``trips // U`` times, and its remainder loop (the next
   loop on the same line, if any) ``trips % U``. A loop that no line of its inlining chain
   marks stops the model with an error. An instruction's weight is the product of the trip
   counts of the loops around it; the sum of the weights is the instructions one warp issues.
   Branches are counted as taken both ways (an upper bound) except the work the kernels
   select at compile time (template arguments), the rare branches between
   ``// model-cold-begin`` and ``// model-cold-end`` (the squash's rescaling for huge or tiny
   |s|): a basic block is not counted when every instruction in it comes from such a region,
   directly or through the functions it calls (the inlining chain); code the compiler runs
   unconditionally (predicated, or selected) stays counted; the calls of the compiler's
   slow paths (``*_slowpath``: the correctly rounded reciprocal, division and square root
   of a zero, subnormal, huge or non-finite operand; the coupling step's reciprocal takes a
   row sum in [1, J + 1]), a basic block made only of the call and its argument moves; and
   the branches whose share of the launch's blocks the launch plan fixes, between
   ``// model-fraction-begin: <expression>`` and ``// model-fraction-end``: the code there
   runs in that fraction of the times its surroundings run (regions nest; the fractions
   multiply). A basic block takes the largest
   fraction among its instructions that come from a region or do work other than integer,
   uniform and constant-bank instructions (those the compiler re-derives inside a branch
   take the branch's fraction; work it hoisted out of one keeps the block fully counted).
   The regions: the chunk tree (``routing_tree.cuh``). Level l of a tree over C chunks has
   n_l = ceil(C / 2^l) nodes, each held by the one block of the tile still in the tree
   there, so its level loop runs sum_l n_l times over the C blocks (``tree_level_visits``
   per block: 126 / 64 = 1.97 at C = 64, not the 6 levels); a node has a sibling in
   2 floor(n_l / 2) of those visits (``tree_pair_share``), and of two siblings the later one
   goes on to add the other's sums (1/2). The last block's work (squash, stores) runs in one
   block of the tile's C (1 / num_chunks). These are the exact totals over the launch,
   spread evenly over its blocks: the model charges the average block, not the block that
   arrives last, whose tree levels and last step run with the SM nearly idle (latency the
   model does not see; see the assumptions). The gradient kernels' stores of dW, dbias
   and dprior go either to the outputs or, when the host runs the backward in slices of
   the batch (``backward_slice_batch < batch``), to op-math sums: one of the two, never both.
   The first iteration's fill of the couplings output (1/J) runs only when r = 1.
4. Takes the launch plan and the launch order from the code that launches the kernels (the
   CPU emulation module, ``benchmarks/emulator.py``, runs the real planner ``routing_launch.h``
   and the real launch order ``routing_host.h``), memsets included: those of a call that
   follows another on the same stream, as in a training loop (the launcher keeps the chunk
   trees' counters zeroed between calls, ``tree_counters.h``, so such a call has none; a
   stream's first call adds one memset, 1 us).
5. Per launch: blocks per SM from the real register count (registers are allocated per SM
   quarter: 16384 per quarter, warps rounded to 256 registers, as ``cuda_occupancy.h``),
   shared memory, threads and the per-SM limits; the busiest SM gets ceil(blocks / SMs)
   blocks. Its cycles are the larger of the issue time, ``warp-instructions / (4 per clock
   x efficiency)`` (one instruction per scheduler and clock, proportionally fewer when fewer
   than 2 warps per scheduler are resident), and each execution pipe's time, ``its
   warp-instructions / its rate`` (warp-instructions per clock per SM, from the CUDA
   Programming Guide's throughput table: FP32 arithmetic 4 on sm_90, 2 on sm_80/sm_75;
   integer and FP32 compare/min/max 2; FP64 2, 1, 1/16; special functions and conversions
   1/2; loads and stores 1). Time = cycles / clock + a fixed gap per launch (a memset too).

Assumptions (stated, not measured): the working set (W, u, the workspaces: 40 MB at
B=128) is served from the 50 MB L2 fast enough, memory latency is hidden by the resident
warps and by independent instructions, barriers and the chunk trees' fences cost nothing
beyond their issue slots (the chunk tree's serial tail, up to 6 levels of a fence, an
atomic and a load from L2 after the last block of a tile arrives, is not charged), shared
memory has no bank conflicts; clock 1.98 GHz (H100 SXM
boost) or 1.41 GHz (A100); 1 us between dependent launches in one stream. The last line is
``<arch> B=<batch> fwd+bwd estimate: <N> us``. Measured GPU times go beside the estimates in
docs/CUDA.md (``make gpu-check`` prints both).
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


# Warp-instructions per clock per SM of each execution pipe (the CUDA Programming Guide's
# arithmetic throughput table divided by 32; loads and stores: 32 LD/ST units per SM).
PIPES_SM90 = {"fp32": 4.0, "alu": 2.0, "fp64": 2.0, "mufu": 0.5, "convert": 0.5, "lsu": 1.0}
PIPES_SM80 = {"fp32": 2.0, "alu": 2.0, "fp64": 1.0, "mufu": 0.5, "convert": 0.5, "lsu": 1.0}
PIPES_SM75 = {"fp32": 2.0, "alu": 2.0, "fp64": 1.0 / 16, "mufu": 0.5, "convert": 0.5, "lsu": 1.0}


@dataclass(frozen=True)
class Gpu:
    name: str
    multiprocessors: int
    clock_ghz: float
    pipes: dict
    registers_per_sm: int = 65536
    sub_partitions: int = 4  # SM quarters: a scheduler and a quarter of the register file each
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_bytes_per_sm: int = 228 * 1024
    shared_reserved_per_block: int = 1024
    launch_gap_us: float = 1.0


GPUS = {
    "sm_90": Gpu("H100 SXM", 132, 1.98, PIPES_SM90),
    "sm_80": Gpu("A100 SXM", 108, 1.41, PIPES_SM80, shared_bytes_per_sm=164 * 1024),
    "sm_75": Gpu("T4", 40, 1.59, PIPES_SM75, max_warps_per_sm=32, max_blocks_per_sm=16, shared_bytes_per_sm=64 * 1024),
}

DTYPES = {"float32": ("float", 4), "float64": ("double", 8), "float16": ("c10::Half", 4), "bfloat16": ("c10::BFloat16", 4)}
STORAGE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}


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
    header = "routing_gradients.cuh" if (CSRC / "cuda" / "routing_gradients.cuh").exists() else "routing_backward.cuh"
    lines = [f'#include "cuda/{header}"', "namespace capsnet::cuda {"]
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
    sass = subprocess.run([find_tool("nvdisasm"), "-gi", "-c", cubin], capture_output=True, text=True, check=True).stdout
    return resources, sass


@dataclass
class Instruction:
    opcode: str
    text: str
    location: tuple[str, int] | None  # the innermost source line
    chain: tuple = ()  # (file, line) from the innermost to the outermost inlined call


def parse_sass(sass: str) -> dict[str, tuple[list[Instruction], dict[str, int]]]:
    """{function: (instructions, {label: index})} from nvdisasm -gi (or -g) output."""
    functions = {}
    parts = re.split(r"\n\s*\.text\.(\S+):\n", sass)
    for k in range(1, len(parts), 2):
        chain: list = []
        reading_chain = False
        instructions: list[Instruction] = []
        labels: dict[str, int] = {}
        for raw in parts[k + 1].split("\n"):
            m = re.match(r'\s*//## File "([^"]+)", line (\d+)', raw)
            if m:
                if not reading_chain:
                    chain = []
                    reading_chain = True
                chain.append((os.path.basename(m.group(1)), int(m.group(2))))
                continue
            m = re.match(r"^\s*\.(L_x_\d+):", raw)
            if m:
                labels[m.group(1)] = len(instructions)
                continue
            m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", raw)
            if m:
                reading_chain = False
                text = m.group(1)
                body = re.sub(r"^@!?U?P\w+\s+", "", text)
                instructions.append(Instruction(body.split()[0] if body else "", text, chain[0] if chain else None, tuple(chain)))
        functions[parts[k]] = (instructions, labels)
    return functions


FP32_ARITHMETIC = ("FMUL", "FADD", "FMUL32I", "FADD32I", "FFMA32I", "HFMA2", "HADD2", "HMUL2")
FP32_COMPARE = ("FMNMX", "FSETP", "FSEL", "FCHK", "FSET")


def instruction_class(instruction: Instruction) -> str:
    op = instruction.opcode
    base = op.split(".")[0]
    if base in ("FFMA", "FFMA2"):
        return "ffma"
    if base in FP32_ARITHMETIC:
        return "fp32 other"
    if base in FP32_COMPARE:
        return "fp32 compare"
    if base in ("DFMA", "DMUL", "DADD", "DSETP", "DMNMX"):
        return "fp64"
    if base in ("LDG", "LD", "LDC", "ULDC"):
        if base in ("LDC", "ULDC"):
            return "constant"
        return "ldg.128" if ".128" in op else "ldg"
    if base in ("STG", "ST", "RED", "ATOM", "ATOMG", "REDG"):
        return "stg"
    if base == "LDGSTS":  # an asynchronous copy from global to shared memory (cp.async)
        return "ldgsts"
    if base == "LDS":
        return "lds"
    if base == "STS":
        return "sts"
    if base in ("LDL", "STL"):
        return "local"
    if base in ("BAR", "BSYNC", "BSSY", "WARPSYNC", "MEMBAR", "ERRBAR", "CGAERRBAR", "CCTL", "DEPBAR", "LDGDEPBAR"):
        return "barrier" if base == "BAR" else "control"
    if base in ("BRA", "EXIT", "RET", "CALL", "JMP", "BRX", "NOP", "YIELD"):
        return "control"
    if base == "MUFU":
        return "mufu"
    if base in ("F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP"):
        return "convert"
    if base.startswith("U") or base in ("S2UR", "R2UR", "VOTEU"):
        return "uniform"
    return "integer"


# The execution pipe of each class ("issue": an issue slot only).
PIPE_OF_CLASS = {
    "ffma": "fp32", "fp32 other": "fp32", "fp32 compare": "alu", "integer": "alu", "fp64": "fp64", "mufu": "mufu",
    "convert": "convert", "ldg": "lsu", "ldg.128": "lsu", "ldgsts": "lsu", "stg": "lsu", "lds": "lsu", "sts": "lsu", "local": "lsu",
    "constant": "issue", "uniform": "issue", "barrier": "issue", "control": "issue",
}


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


def fraction_regions(root: pathlib.Path = CSRC) -> dict[tuple[str, int], tuple]:
    """{(file name, line): ((region, expression), ...)} for the lines between
    '// model-fraction-begin: <expression>' and '// model-fraction-end': code that runs in
    that fraction of the times its surroundings run (evaluated with the launch plan's
    numbers), innermost region last; regions nest."""
    regions = {}
    for path in list((root / "cuda").glob("*.cuh")) + [root / "routing_math.h"]:
        open_regions: list = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            m = re.search(r"//\s*model-fraction-begin:\s*(.+?)\s*$", line)
            if m:
                open_regions.append(((path.name, number), m.group(1)))
                continue
            if "model-fraction-end" in line:
                if not open_regions:
                    raise SystemExit(f"cuda_model: {path.name}:{number}: model-fraction-end without a begin")
                open_regions.pop()
                continue
            if open_regions:
                regions[(path.name, number)] = tuple(open_regions)
        if open_regions:
            raise SystemExit(f"cuda_model: {path.name}: model-fraction-begin at line {open_regions[-1][0][1]} without an end")
    return regions


def block_fractions(instructions: list[Instruction], labels: dict[str, int], regions: dict, env: dict) -> list[float]:
    """Per instruction: the fraction of its surroundings' runs in which its basic block runs.
    An instruction's fraction is the product of the fractions of the regions its source
    line and the calls that inlined it lie in (each region once); a basic block gets the
    largest fraction among the instructions that vote: those from a region, and those from
    outside every region that do work (floating point, memory, barriers). So code the
    compiler moved out of a branch, or predicated into unconditional code, stays fully
    counted, while the integer and uniform instructions it re-derives inside a branch
    (loop invariants, addresses) take the branch's fraction. A block with no voter takes
    the largest fraction of its instructions."""
    values: dict[str, float] = {}
    in_region = [any(frame in regions for frame in ins.chain) for ins in instructions]

    def fraction_of(ins: Instruction) -> float:
        seen = {}
        for frame in ins.chain:
            for region, expression in regions.get(frame, ()):
                seen[region] = expression
        product = 1.0
        for expression in seen.values():
            if expression not in values:
                values[expression] = float(eval(expression, {"ceil": math.ceil, "min": min, "max": max}, dict(env)))  # noqa: S307
                if not 0.0 <= values[expression] <= 1.0:
                    raise SystemExit(f"cuda_model: model-fraction {expression!r} = {values[expression]} is not in [0, 1]")
            product *= values[expression]
        return product

    own = [fraction_of(ins) for ins in instructions]
    fractions = [1.0] * len(instructions)
    for start, end in basic_blocks(instructions, labels):
        voters = [
            i for i in range(start, end)
            if in_region[i] or instruction_class(instructions[i]) not in ("control", "integer", "uniform", "constant")
        ]
        largest = max(own[i] for i in (voters or range(start, end)))
        for i in range(start, end):
            fractions[i] = largest
    return fractions


def basic_blocks(instructions: list[Instruction], labels: dict[str, int]) -> list[tuple[int, int]]:
    """[start, end) of each basic block: a label or the instruction after a branch starts one."""
    leaders = {0, *labels.values()}
    for index, ins in enumerate(instructions):
        if ins.opcode.split(".")[0] in ("BRA", "EXIT", "RET", "JMP", "BRX"):
            leaders.add(index + 1)
    starts = sorted(x for x in leaders if x < len(instructions))
    return [(start, starts[k + 1] if k + 1 < len(starts) else len(instructions)) for k, start in enumerate(starts)]


def loop_marker(loop: Loop, instructions: list[Instruction], markers: dict):
    """The '// model-loop:' expression of a loop: on the source line of its back edge, or of
    a call that inlined it."""
    back_edge = instructions[loop.end]
    for frame in back_edge.chain or ((loop.location,) if loop.location else ()):
        expression = markers.get(frame)
        if expression is not None and expression != COLD:
            return expression
    return None


def cold_instructions(instructions: list[Instruction], labels: dict[str, int], markers: dict) -> list[bool]:
    """Per instruction: inside a cold region. A basic block is cold when each of its
    instructions (control flow aside) comes from a cold region, directly or through an
    inlined call; an instruction of a block that also runs other code is not (the compiler
    issues it with the block)."""
    from_cold = [any(markers.get(frame) == COLD for frame in ins.chain) for ins in instructions]
    cold = [False] * len(instructions)
    for start, end in basic_blocks(instructions, labels):
        block = range(start, end)
        work = [i for i in block if instruction_class(instructions[i]) != "control"]
        if (work and all(from_cold[i] for i in work)) or slow_path_call(instructions[start:end]):
            for i in block:
                cold[i] = True
    return cold


SLOW_PATH_CALL = re.compile(r"\bCALL\.\S*\s+`?\(?\$?\S*_slowpath")
ARGUMENT_MOVES = ("MOV", "IMAD.MOV", "IMAD.MOV.U32", "MOV32I")


def slow_path_call(block: list[Instruction]) -> bool:
    """A basic block that only calls one of the compiler's slow paths (``*_slowpath``: the
    correctly rounded reciprocal, division or square root of a zero, subnormal, huge or
    non-finite operand) with its argument and return-address moves. The kernels' operands
    there are normal numbers (the coupling step's reciprocal takes a row sum in [1, J + 1]),
    so the fast path runs and the block does not."""
    calls = [ins for ins in block if ins.opcode.split(".")[0] == "CALL"]
    return (
        len(calls) == 1
        and SLOW_PATH_CALL.search(calls[0].text) is not None
        and all(ins.opcode in ARGUMENT_MOVES or instruction_class(ins) == "control" for ins in block)
    )


def loop_weights(
    name: str, instructions: list[Instruction], labels: dict[str, int], env: dict, markers: dict, regions: dict | None = None
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
    cold = cold_instructions(instructions, labels, markers)
    # Trip counts from the markers; an unrolled loop is a main loop and a remainder loop
    # with the same back-edge line, one after the other.
    assigned: set[int] = set()
    for k, loop in enumerate(loops):
        if k in assigned:
            continue
        if cold[loop.end]:
            loop.trips = 0.0
            continue
        expression = loop_marker(loop, instructions, markers)
        if expression is None:
            raise SystemExit(
                f"cuda_model: {name}: loop at {loop.location} has no '// model-loop: <trips>' comment in the source"
            )
        declared_unroll = None
        if ";" in expression:  # "<trips>; unroll <U>": a #pragma unroll U loop
            expression, _, clause = expression.partition(";")
            declared_unroll = int(clause.split()[-1])
        trips = float(eval(expression, {"ceil": math.ceil, "min": min, "max": max}, dict(env)))  # noqa: S307
        later = loops[k + 1] if k + 1 < len(loops) else None
        if declared_unroll is not None and later is not None and later.location == loop.location and later.start > loop.end:
            loop.trips = float(trips // declared_unroll)
            later.trips = float(trips % declared_unroll)
            assigned.add(k + 1)
        else:
            # Without a remainder loop the leftover iterations are peeled outside the loop,
            # where they are counted once.
            loop.trips = float(trips // declared_unroll) if declared_unroll else trips
    fractions = block_fractions(instructions, labels, regions or {}, env)
    weights = [0.0 if c else f for c, f in zip(cold, fractions)]
    for loop in loops:
        for index in range(loop.start, loop.end + 1):
            weights[index] *= loop.trips
    return weights


# ---------------------------------------------------------------------------------------
# The plan, the launches, the estimate.
# ---------------------------------------------------------------------------------------
def describe_plan(batch: int, shape: dict, iterations: int, acc_bytes: int, sms: int, detach: bool = False,
                  dtype: str = "float32") -> dict:
    """The real planner's plan (routing_launch.h, through the emulator module) for a call
    without a logit prior, with storage of `dtype`, under the current CAPSNET_CUDA_PLAN."""
    from benchmarks import emulator

    return emulator.load().describe_plan(
        batch, shape["num_in"], shape["num_out"], shape["dim_out"], shape["dim_in"], iterations, acc_bytes, sms,
        False, detach, float32_storage=dtype == "float32",
    )


def plan_and_launches(batch: int, shape: dict, iterations: int, acc_bytes: int, sms: int, detach: bool,
                      dtype: str = "float32"):
    """(plan dict, [(launch text, plan key)]) from the emulator module: the real planner and
    launch order, for storage of `dtype`."""
    import torch

    from benchmarks import emulator

    simt = emulator.load()
    plan = describe_plan(batch, shape, iterations, acc_bytes, sms, detach, dtype)
    # The launch order depends on r, the options and whether the chunks are added up in a
    # tree (a memset of its counters) only: run a tiny call of the same kind.
    tiny = torch.Generator().manual_seed(0)
    num_in = 8 if plan.get("chunk_levels", 0) > 0 else 2
    tiny_plan = simt.describe_plan(1, num_in, shape["num_out"], shape["dim_out"], shape["dim_in"], iterations, acc_bytes, sms)
    assert (tiny_plan.get("chunk_levels", 0) > 0) == (plan.get("chunk_levels", 0) > 0), "the tiny call must use the same launches"
    # Tensors of the storage type: the rings, the wide gradient rows and the gradient kernel
    # without its loads ahead exist for float32 only.
    storage = getattr(torch, dtype)
    u = torch.randn(1, num_in, shape["dim_in"], generator=tiny).to(storage)
    W = torch.randn(num_in, shape["num_out"], shape["dim_out"], shape["dim_in"], generator=tiny).to(storage)
    # The second of two calls: a training step's, which finds the chunk trees' counters kept
    # by the launcher (tree_counters.h) and launches no memset; only a stream's first call
    # (or one needing more counters than are kept) zeroes them.
    grad_v = torch.randn(1, shape["num_out"], shape["dim_out"], generator=tiny).to(storage)
    simt.forget_tree_counters()
    for _ in range(2):
        simt.clear_launch_log()
        _, s_saved, _ = simt.routing_forward(u, W, None, None, iterations, False, detach, False)
        forward_count = len(simt.full_launch_log())
        simt.routing_backward(grad_v, u, W, None, s_saved, False, detach)
    launches = list(simt.full_launch_log())
    return plan, launches[:forward_count], launches[forward_count:]


MEMSET = "cudaMemsetAsync"  # a stream operation in the launch log that is not a kernel: a launch gap


def enum_values(root: pathlib.Path = CSRC) -> dict[str, list[str]]:
    """{enum class name: its enumerators in order} from the kernel sources (the mangled
    name of an instantiation holds an enumerator's index)."""
    enums = {}
    for path in (root / "cuda").glob("*.cuh"):
        code = re.sub(r"//[^\n]*", "", path.read_text())  # comments may hold braces
        for name, body in re.findall(r"enum class (\w+)\s*\{([^}]*)\}", code):
            enums[name] = re.findall(r"^\s*(k\w+)", body, flags=re.M)
    return enums


def instantiation_of(launch: str, scalar: str, tile: str) -> str:
    """'forward_iteration_kernel<scalar_t, Tile, ForwardStep::kLater>' -> explicit instantiation
    declaration."""
    name, _, arguments = launch.partition("<")
    arguments = arguments.rstrip(">").replace("scalar_t", scalar).replace("Tile", tile)
    arguments = re.sub(r"\b(\w+)::(k\w+)", r"capsnet::cuda::\1::\2", arguments)
    params = "PriorParams" if name.startswith("prior") else ("ForwardParams" if name.startswith("forward") else "BackwardParams")
    return f"{name}<{arguments}>(const {params}<{scalar}>)"


def mangled_match(mangled: dict, instantiation: str, enums: dict | None = None):
    """The mangled name of an explicit instantiation: its name, and its bool and enum
    template arguments in order (Lb1E, L...<enum>E<index>E)."""
    enums = enum_values() if enums is None else enums
    name = instantiation.split("<")[0]
    arguments = instantiation.split("<", 1)[1].split(">(", 1)[0]
    flags = []
    for argument in arguments.split(","):
        argument = argument.strip()
        if argument in ("true", "false"):
            flags.append("Lb1E" if argument == "true" else "Lb0E")
        m = re.search(r"(\w+)::(k\w+)$", argument)
        if m:
            enum, value = m.groups()
            flags.append(f"{len(enum)}{enum}E{enums[enum].index(value)}E")
    pattern = ".*".join(re.escape(f) for f in flags)
    candidates = [m for m in mangled if f"{len(name)}{name}I" in m and re.search(pattern, m.split(f"{len(name)}{name}I", 1)[1])]
    if len(candidates) != 1:
        raise SystemExit(f"cuda_model: cannot find {instantiation} among {list(mangled)}")
    return candidates[0]


def row_key(launch: str) -> str:
    """How the tables name a launch: the kernel, and its compile-time step or pass."""
    name = launch.split("<")[0]
    if name == MEMSET:
        return MEMSET
    if "<" in launch and re.search(r"\btrue\b", launch) and name.startswith("forward_partial_sums"):
        return name + "<first>"  # the kernels before the rework
    m = re.search(r"::(k\w+)", launch)
    staged = ", staged" if "kInputRingSlots" in launch else ""  # W and u through the InputRing
    if "kNarrowGradientRows" in launch:  # float gradient_kernel, 4 rows of W[i, j] per thread (default)
        # Without its loads ahead: CAPSNET_CUDA_PLAN=gradient_loads_ahead=0.
        return f"{name}<narrow, at use>" if re.search(r"\bfalse\s*>", launch) else f"{name}<narrow>"
    if "kWideGradientRows" in launch:  # float gradient_kernel, 8 rows (CAPSNET_CUDA_PLAN=gradient_rows=8)
        return f"{name}<wide>"
    return f"{name}<{m.group(1)}{staged}>" if m else name


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
    bound: str = ""
    per_warp: float = 0.0  # warp-instructions one warp of the kernel issues
    source_lines: dict = field(default_factory=dict)  # source_line_costs of the kernel, per warp


def source_line_costs(instructions: list[Instruction], weights: list[float]) -> dict[tuple, dict[str, float]]:
    """Where one warp's instructions come from: {(the kernel's own source line, the innermost
    source line): {class: warp-instructions}}. The kernel's line is the outermost of the
    instruction's chain of inlined calls (the call in the kernel's body that brought it in),
    the innermost is the line that produced it; an instruction without line information
    counts under (None, None)."""
    costs: dict[tuple, dict[str, float]] = {}
    for ins, weight in zip(instructions, weights):
        if weight == 0:
            continue
        key = (ins.chain[-1] if ins.chain else ins.location, ins.location)
        classes = costs.setdefault(key, {})
        cls = instruction_class(ins)
        classes[cls] = classes.get(cls, 0.0) + weight
    return costs


def format_source_lines(row: KernelEstimate, top: int = 15) -> str:
    """The `top` source lines of a kernel by warp-instructions (one warp's), with their share
    of the warp's total and their largest classes: where to look to make the kernel leaner."""

    def place(location) -> str:
        return f"{location[0]}:{location[1]}" if location else "?"

    total = row.per_warp or 1.0
    ranked = sorted(row.source_lines.items(), key=lambda item: -sum(item[1].values()))
    lines = [
        f"{row.kernel}: {row.per_warp:.0f} warp-instructions per warp; its top {min(top, len(ranked))} source lines",
        "| kernel line | innermost line | per warp | share | largest classes |",
        "|---|---|---|---|---|",
    ]
    for (outer, inner), classes in ranked[:top]:
        count = sum(classes.values())
        largest = ", ".join(f"{cls} {n:.0f}" for cls, n in sorted(classes.items(), key=lambda item: -item[1])[:4])
        lines.append(f"| {place(outer)} | {place(inner)} | {count:.0f} | {count / total:.1%} | {largest} |")
    return "\n".join(lines)


def blocks_per_sm(gpu: Gpu, registers: int, threads: int, shared: int) -> int:
    """Resident blocks per SM, as cuda_occupancy.h computes them: registers are allocated
    per warp in units of 256, and each SM quarter holds as many warps as fit its quarter of
    the register file."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    warps_by_regs = (gpu.registers_per_sm // gpu.sub_partitions // regs_per_warp) * gpu.sub_partitions
    by_regs = warps_by_regs // warps
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
    bound: str  # what limits it: "issue" or a pipe


def cost_of_launch(gpu: Gpu, res: Resources, classes: dict, config: dict) -> LaunchCost:
    """The time of one launch (the module docstring gives the arithmetic)."""
    blocks = math.prod(config["grid"])
    threads = math.prod(config["block"])
    warps = math.ceil(threads / 32)
    resident = blocks_per_sm(gpu, res.registers, threads, config["shared_bytes"] + res.static_shared)
    if resident == 0:
        raise SystemExit(f"cuda_model: a launch with {threads} threads and {res.registers} registers cannot run")
    busiest = math.ceil(blocks / gpu.multiprocessors)
    concurrent = min(resident, busiest)
    efficiency = min(1.0, concurrent * warps / gpu.sub_partitions / 2)  # 2 warps per scheduler hide dependent issue
    per_warp = sum(classes.values())
    warps_on_busiest = busiest * warps
    cycles = {"issue": warps_on_busiest * per_warp / (gpu.sub_partitions * efficiency)}
    for pipe, rate in gpu.pipes.items():
        count = sum(n for cls, n in classes.items() if PIPE_OF_CLASS.get(cls) == pipe)
        cycles[pipe] = warps_on_busiest * count / rate
    bound = max(cycles, key=cycles.get)
    return LaunchCost(blocks, warps, resident, per_warp, cycles[bound] / (gpu.clock_ghz * 1e3) + gpu.launch_gap_us, bound)


def chunk_tree_counts(chunks: int, levels: int) -> dict:
    """What the blocks of one sample tile do in the chunk tree (routing_tree.cuh), as
    fractions for the '// model-*' comments. Level l has n_l = ceil(chunks / 2^l) nodes,
    each held by one block (the others have left): the level loop runs sum_l n_l times over
    the tile's `chunks` blocks (tree_level_visits per block, 126 / 64 = 1.97 at 64 chunks
    instead of 6); a node has a sibling in 2 floor(n_l / 2) of those visits (the others
    pass up alone: tree_pair_share), and of two siblings the later one goes on (a half)."""
    nodes = [((chunks - 1) >> level) + 1 for level in range(levels)]
    visits = sum(nodes)
    return {
        "tree_level_visits": visits / chunks,
        "tree_pair_share": sum(2 * (n // 2) for n in nodes) / visits if visits else 1.0,
    }


def plan_env(plan: dict, shape: dict, detach: bool) -> dict:
    """The names a '// model-loop:' expression may use: the shape, the plan's numbers and a
    few derived from them."""
    env = dict(shape)
    env.update({key: value for key, value in plan.items() if isinstance(value, (int, float)) and not isinstance(value, bool)})
    env["grad_s_terms"] = 1 if detach else shape["iterations"]
    env["has_prior"] = 0  # the model's calls have no logit prior (plan_and_launches)
    env.update(chunk_tree_counts(plan.get("num_chunks", 1), plan.get("chunk_levels", 0)))
    if plan.get("grad_input_slice"):
        env["input_slices"] = math.ceil(shape["dim_in"] / plan["grad_input_slice"])
    gradient = plan["launches"].get("gradient_kernel") if plan.get("tile") == "CapsNetTile" else plan["launches"].get("grad_weight_kernel")
    if gradient is not None:
        env["gradient_blocks"] = math.prod(gradient["grid"])
        env["gradient_threads"] = math.prod(gradient["block"])
        env["gradient_round_rows"] = (16 // env.get("acc_bytes", 4)) * 8 * shape["dim_in"]
    return env


def estimate(args) -> tuple[list[KernelEstimate], list[KernelEstimate], dict, dict]:
    gpu = GPUS[args.arch]
    scalar, acc_bytes = DTYPES[args.dtype]
    plan, forward, backward = plan_and_launches(
        args.batch, CAPSNET_SHAPE, args.iterations, acc_bytes, gpu.multiprocessors, args.detach_routing, args.dtype
    )
    tile = plan["tile"]
    kernels = [launch for launch in forward + backward if launch != MEMSET]
    instantiations = sorted({instantiation_of(launch, scalar, tile) for launch in kernels})
    with tempfile.TemporaryDirectory() as workdir:
        resources, sass = compile_kernels(instantiation_source(instantiations), args.arch, workdir)
    functions = parse_sass(sass)
    shape = dict(CAPSNET_SHAPE, batch=args.batch, iterations=args.iterations)
    env = plan_env(plan, dict(shape, acc_bytes=acc_bytes, storage_bytes=STORAGE_BYTES[args.dtype]), args.detach_routing)
    per_function = {}
    lines_of_function = {}
    markers = source_markers()
    regions = fraction_regions()
    for mangled, (instructions, labels) in functions.items():
        weights = loop_weights(mangled, instructions, labels, env, markers, regions)
        lines_of_function[mangled] = source_line_costs(instructions, weights)
        classes: dict[str, float] = {}  # the lines' classes summed: the kernel's, per warp
        for line_classes in lines_of_function[mangled].values():
            for cls, count in line_classes.items():
                classes[cls] = classes.get(cls, 0.0) + count
        per_function[mangled] = classes
    enums = enum_values()

    def run(launches):
        rows: dict[str, KernelEstimate] = {}
        for launch in launches:
            key = row_key(launch)
            row = rows.setdefault(key, KernelEstimate(key))
            row.launches += 1
            if launch == MEMSET:
                row.microseconds += gpu.launch_gap_us
                row.bound = "gap"
                continue
            name = launch.split("<")[0]
            mangled = mangled_match(resources, instantiation_of(launch, scalar, tile), enums)
            config = plan["launches"][name]
            res = resources[mangled]
            classes = per_function[mangled]
            launch_cost = cost_of_launch(gpu, res, classes, config)
            blocks, resident, per_warp, warps = launch_cost.blocks, launch_cost.resident, launch_cost.per_warp, launch_cost.warps
            row.registers, row.spill_bytes = res.registers, res.spill_bytes
            row.blocks, row.blocks_per_sm = blocks, resident
            row.waves = blocks / (resident * gpu.multiprocessors)
            row.warp_instructions += blocks * warps * per_warp
            for cls, count in classes.items():
                row.classes[cls] = row.classes.get(cls, 0.0) + blocks * warps * count
            row.microseconds += launch_cost.microseconds
            row.bound = launch_cost.bound
            row.per_warp = per_warp
            row.source_lines = lines_of_function[mangled]
        return list(rows.values())

    return run(forward), run(backward), plan, resources


def format_table(title: str, rows: list[KernelEstimate]) -> str:
    lines = [
        f"{title}",
        "| kernel | launches | regs | spill B | blocks | blocks/SM | waves | warp-instr (M) | FFMA share | LDG | LDS+STS | BAR | bound | est. us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        total = row.warp_instructions or 1.0
        ffma = row.classes.get("ffma", 0.0) + row.classes.get("fp64", 0.0)
        ldg = sum(row.classes.get(cls, 0.0) for cls in ("ldg", "ldg.128", "ldgsts"))  # cp.async too
        lds = row.classes.get("lds", 0.0) + row.classes.get("sts", 0.0)
        if row.kernel == MEMSET:
            lines.append(f"| {row.kernel} | {row.launches} | | | | | | | | | | | gap | {row.microseconds:.1f} |")
            continue
        lines.append(
            f"| {row.kernel} | {row.launches} | {row.registers} | {row.spill_bytes} | {row.blocks} | {row.blocks_per_sm} | "
            f"{row.waves:.2f} | {row.warp_instructions / 1e6:.2f} | {ffma / total:.0%} | {ldg / total:.0%} | "
            f"{lds / total:.0%} | {row.classes.get('barrier', 0.0) / total:.1%} | {row.bound} | {row.microseconds:.1f} |"
        )
    lines.append(f"| **total** | {sum(r.launches for r in rows)} | | | | | | {sum(r.warp_instructions for r in rows) / 1e6:.2f} | | | | | | "
                 f"**{sum(r.microseconds for r in rows):.1f}** |")
    return "\n".join(lines)


def resource_check(arch: str, dtype: str = "float32") -> int:
    """CI: at least one resident block per SM for every launch of the CapsNet plan at B in
    {32, 128, 512, 1024}, and zero spills: in every float32 CapsNet-tile kernel; in float64,
    in the backward's kernels (on sm_90 the forward's float64 kernels spill 40 bytes before
    their input loop, none inside it: docs/CUDA.md)."""
    failures = []
    for batch in (32, 128, 512, 1024):
        for detach in (False, True):
            args = argparse.Namespace(arch=arch, batch=batch, dtype=dtype, iterations=3, detach_routing=detach)
            forward, backward, plan, resources = estimate(args)
            for row in (forward + backward if dtype == "float32" else backward):
                if row.spill_bytes:
                    failures.append(f"B={batch}: {row.kernel} spills {row.spill_bytes} bytes")
            for row in forward + backward:
                if row.kernel == MEMSET:
                    continue
                if row.blocks_per_sm < 1:
                    failures.append(f"B={batch}: {row.kernel} has no resident block per SM")
            kernels = [r for r in forward + backward if r.kernel != MEMSET]
            print(f"{dtype} B={batch} detach_routing={detach}: {len(kernels)} kernels, "
                  f"max registers {max(r.registers for r in kernels)}, "
                  f"min blocks/SM {min(r.blocks_per_sm for r in kernels)}, "
                  f"spill bytes {sum(r.spill_bytes for r in kernels)}")
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
    parser.add_argument("--check", action="store_true", help="CI resource check at B in {32, 128, 512, 1024} (of --dtype)")
    parser.add_argument(
        "--lines", metavar="KERNEL", default=None,
        help="also print where the instructions of the kernels whose row contains KERNEL come from "
        "(their top source lines; e.g. --lines kLater, --lines gradient_kernel)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        return resource_check(args.arch, args.dtype)
    gpu = GPUS[args.arch]
    if args.lines is not None:  # before the compile: the launch order alone names the kernels
        _, forward_launches, backward_launches = plan_and_launches(
            args.batch, CAPSNET_SHAPE, args.iterations, DTYPES[args.dtype][1], gpu.multiprocessors, args.detach_routing,
            args.dtype,
        )
        names = sorted({row_key(launch) for launch in forward_launches + backward_launches if launch != MEMSET})
        if not any(args.lines in name for name in names):
            print(f"cuda_model: --lines {args.lines!r} matches no kernel of this call; its kernels: {', '.join(names)}",
                  file=sys.stderr)
            return 2
    forward, backward, plan, _ = estimate(args)
    print(f"{gpu.name} ({args.arch}: {gpu.multiprocessors} SMs, {gpu.clock_ghz} GHz), CapsNet shape "
          f"N_in={CAPSNET_SHAPE['num_in']} N_out={CAPSNET_SHAPE['num_out']} D_out={CAPSNET_SHAPE['dim_out']} "
          f"D_in={CAPSNET_SHAPE['dim_in']}, r={args.iterations}, {args.dtype}, B={args.batch}"
          + (", detach_routing" if args.detach_routing else ""))
    print(f"plan: {plan['tile']}, {plan['samples_per_block']} samples x {CAPSNET_SHAPE['num_out']} capsules per block, "
          f"{plan['num_chunks']} chunks of {plan['inputs_per_chunk']} inputs"
          + (f" ({plan['chunk_levels']} chunk-tree levels)" if "chunk_levels" in plan else "")
          + f", gradient sample groups {plan['sample_groups']}\n")
    print(format_table("forward", forward))
    print()
    print(format_table("backward", backward))
    if args.lines is not None:
        for row in forward + backward:
            if args.lines in row.kernel and row.kernel != MEMSET:
                print()
                print(format_source_lines(row))
    fwd = sum(r.microseconds for r in forward)
    bwd = sum(r.microseconds for r in backward)
    print(f"\nforward {fwd:.1f} us, backward {bwd:.1f} us")
    print(f"{args.arch} B={args.batch} fwd+bwd estimate: {fwd + bwd:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
