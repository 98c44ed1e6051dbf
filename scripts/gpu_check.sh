#!/usr/bin/env bash
# make gpu-check: everything a GPU can tell about the CUDA kernels, in one command, offline.
#
# For someone with a GPU for half an hour and no network: uses the Python that already has
# torch (no venv, no downloads), builds the extension in place, runs the CUDA tests with
# CUDA_LAUNCH_BLOCKING=1 (a junit report), the benchmark at B in {32, 128, 512, 1024} and the
# per-call cost of the Python layers (benchmarks/call_overhead.py), the
# per-kernel profile beside the static model's estimates, four experiments (the routing loop
# with W and u staged in shared memory against the direct loads, benchmarks/staging_experiment.py;
# the library's routing kernels without their input rings,
# CAPSNET_CUDA_PLAN=staging_slots=0,sweep_staging_slots=0; the gradient kernel with 8 rows
# per thread, CAPSNET_CUDA_PLAN=gradient_rows=8; the kernels'
# times under other launch plans, benchmarks/plan_sweep.py), and a short MNIST
# training on the full set. Everything goes to benchmarks/results/gpu-check-<gpu>/, ready to commit.
#
#   PYTHON         the interpreter with torch (default: python3)
#   DATA_DIR       MNIST in torchvision's layout (DATA_DIR/MNIST/raw; default ../shared/data)
#   EPOCHS         training epochs (default 2)
#   ONLY           run only these steps (names as below, space-separated), appending to
#                  steps.md: for machines that limit one command's time, e.g.
#                  ONLY="environment build tests", then ONLY="benchmark kernels training"
#   TORCH_CUDA_ARCH_LIST  the build's archs (default: the GPU's own, the quickest build;
#                  CI builds every supported arch without a GPU)
#   GPU_CHECK_OUT  where the results go (default benchmarks/results/gpu-check-<gpu>)
#   DRY_RUN=1      no GPU needed: print every command, run the parts that need no GPU
#                  (the static model's side of the profile), skip the rest
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-../shared/data}
EPOCHS=${EPOCHS:-2}
DRY_RUN=${DRY_RUN:-0}
ONLY=${ONLY:-}
STEPS="environment build tests benchmark kernels staging direct wide plans stalls training"
for name in $ONLY; do
  case " $STEPS " in
    *" $name "*) ;;
    *) echo "gpu-check: ONLY names an unknown step '$name'; the steps are: $STEPS" >&2; exit 2 ;;
  esac
done
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

gpu_name() {
  if [ "$DRY_RUN" = 1 ]; then echo "dry-run"; return; fi
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1
}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "$DRY_RUN" != 1 ]; then
  # "9.0" on an H100: one arch to compile instead of the default four.
  TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
fi
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST
SLUG=$(gpu_name | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\+/-/g; s/^-//; s/-$//')
OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu-check-${SLUG:-unknown}}
mkdir -p "$OUT"
STATUS=0

# Whether capsnet._C loads with CUDA kernels; if not, EXTENSION_PROBLEM says why. The steps
# after build need them: without, each would only fail, slowly (on an H200 whose build had
# been cut short, such failures took 136 s of a 15-minute lease). Asked once per run (the
# build step, which could change the answer, comes before every step that asks).
EXTENSION_PROBLEM=
EXTENSION_CHECKED=0
extension_ready() {
  if [ "$EXTENSION_CHECKED" = 0 ]; then
    if EXTENSION_PROBLEM=$("$PYTHON" -c "
import sys, torch, capsnet._extension as e
sys.exit(0 if 'cuda' in e.KERNEL_DEVICE_TYPES else e.missing_reason('cuda', torch.float32))" 2>&1); then
      EXTENSION_PROBLEM=
    else
      EXTENSION_PROBLEM=${EXTENSION_PROBLEM:-"$PYTHON could not run the check"}
    fi
    EXTENSION_CHECKED=1
  fi
  [ -z "$EXTENSION_PROBLEM" ]
}

# step NAME COMMAND...: runs (or, dry, prints) one step, timed, its output in $OUT/NAME.log.
# NEEDS_GPU=0: runs in a dry run too; NEEDS_EXTENSION=1: skipped unless the CUDA kernels load.
step() {
  local name=$1; shift
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
    echo "== $name: not in ONLY, skipped"
    return 0
  fi
  echo "== $name: $*"
  if [ "$DRY_RUN" = 1 ] && [ "${NEEDS_GPU:-1}" = 1 ]; then
    echo "   (dry run: skipped, needs the GPU)"
    return 0
  fi
  if [ "${NEEDS_EXTENSION:-0}" = 1 ] && [ "$DRY_RUN" != 1 ]; then
    if ! extension_ready; then
      echo "   skipped: the CUDA kernels are not built ($EXTENSION_PROBLEM)"
      echo "| $name | skipped: CUDA kernels not built | 0 |" >> "$OUT/steps.md"
      STATUS=1
      return 0
    fi
  fi
  local start=$(date +%s)
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local seconds=$(( $(date +%s) - start ))
  echo "   exit $rc after ${seconds}s (log: $OUT/$name.log)"
  echo "| $name | $rc | $seconds |" >> "$OUT/steps.md"
  tail -5 "$OUT/$name.log" | sed 's/^/   | /'
  [ $rc -eq 0 ] || STATUS=1
}

# A whole run starts the table afresh; ONLY runs add their rows to it.
if [ -z "$ONLY" ] || [ ! -f "$OUT/steps.md" ]; then
  echo "| step | exit | seconds |" > "$OUT/steps.md"
  echo "|---|---|---|" >> "$OUT/steps.md"
fi

NEEDS_GPU=1 step environment bash -c "
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
  $PYTHON -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version()); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
  $CUDA_HOME/bin/nvcc --version | tail -2
  echo TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"

NEEDS_GPU=1 step build env CAPSNET_FORCE_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .

NEEDS_GPU=1 NEEDS_EXTENSION=1 step tests env CUDA_LAUNCH_BLOCKING=1 "$PYTHON" -m pytest tests -m needs_cuda -q -p no:cacheprovider \
  --junitxml="$OUT/tests-junit.xml"

NEEDS_GPU=1 NEEDS_EXTENSION=1 step benchmark bash -c "
  $PYTHON -m benchmarks.bench_routing --device cuda --batch-sizes 32 128 512 1024 --name gpu-check-${SLUG}/benchmark &&
  $PYTHON -m benchmarks.call_overhead --device cuda"

NEEDS_GPU=0 NEEDS_EXTENSION=1 step kernels "$PYTHON" -m benchmarks.cuda_profile --batch-sizes 32 128 512 1024 --out "$OUT" \
  $([ "$DRY_RUN" = 1 ] && echo --dry-run)

# Builds its own small extension (nvcc): needs the GPU, not capsnet._C's kernels.
NEEDS_GPU=1 step staging "$PYTHON" -m benchmarks.staging_experiment --batch-sizes 32 128 512 1024 --out "$OUT"

# The alternatives to the default plan's kernels, per kernel beside the kernels step: every
# kernel loading W, u and the gradient's terms where it uses them, instead of through the
# forward's and the backward sweep's shared-memory rings and the gradient kernel's loads
# ahead (CAPSNET_CUDA_PLAN=staging_slots=0,sweep_staging_slots=0,gradient_loads_ahead=0); and
# the gradient kernel with 8 rows of W[i, j] per thread, one sample's dL/du_hat loads at a
# time, instead of 4 (CAPSNET_CUDA_PLAN=gradient_rows=8).
NEEDS_GPU=0 NEEDS_EXTENSION=1 step direct env CAPSNET_CUDA_PLAN=staging_slots=0,sweep_staging_slots=0,gradient_loads_ahead=0 "$PYTHON" -m benchmarks.cuda_profile \
  --batch-sizes 32 128 512 1024 --out "$OUT" --suffix=-direct $([ "$DRY_RUN" = 1 ] && echo --dry-run)

NEEDS_GPU=0 NEEDS_EXTENSION=1 step wide env CAPSNET_CUDA_PLAN=gradient_rows=8 "$PYTHON" -m benchmarks.cuda_profile \
  --batch-sizes 32 128 512 1024 --out "$OUT" --suffix=-wide $([ "$DRY_RUN" = 1 ] && echo --dry-run)

NEEDS_GPU=1 NEEDS_EXTENSION=1 step plans "$PYTHON" -m benchmarks.plan_sweep --batch-sizes 32 128 512 1024 --out "$OUT"

# What the kernels wait on (Nsight Compute's warp-state statistics at B = 128 and 1024), where
# the machine has ncu and lets it read the counters; stalls.md says when it does not.
NEEDS_GPU=1 NEEDS_EXTENSION=1 step stalls "$PYTHON" -m benchmarks.stall_profile --batch-sizes 128 1024 --out "$OUT"

NEEDS_GPU=1 NEEDS_EXTENSION=1 step training "$PYTHON" train_mnist.py --data-dir "$DATA_DIR" --out-dir "$OUT/training" \
  --epochs "$EPOCHS" --device cuda --no-progress --overwrite

echo
cat "$OUT/steps.md"
echo "results in $OUT (commit them)"
exit $STATUS
