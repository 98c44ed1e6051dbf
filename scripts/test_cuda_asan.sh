#!/usr/bin/env bash
# make test-cuda-asan: the emulated CUDA tests with AddressSanitizer and UndefinedBehaviorSanitizer.
#
# The emulator module (csrc/simt + the kernels) is built with -fsanitize=address,undefined
# (benchmarks/emulator.py, CAPSNET_SIMT_SANITIZE=1); Python is not, so the ASan runtime is
# preloaded. A sanitizer aborts the process it reports in, and pytest's capture would swallow
# that report: the reports go to files (log_path) instead, are printed here, and any report
# fails the run, whatever pytest said.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LOGS=$(pwd)/build/sanitizer-logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
export CAPSNET_SIMT_SANITIZE=1

echo "building the sanitized emulator (without the preloaded runtime: the compiler is not instrumented)"
ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0 "$PY" -c "from benchmarks import emulator; emulator.load()" \
  || { echo "test-cuda-asan: the sanitized emulator did not build"; exit 1; }

runtime="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# detect_leaks=0: CPython and torch keep allocations to exit; the fibers switch stacks with
# ASan's annotations, and stack-use-after-return would need fake stacks per fiber.
ASAN_OPTIONS="log_path=$LOGS/asan:detect_leaks=0:detect_stack_use_after_return=0:halt_on_error=1" \
UBSAN_OPTIONS="log_path=$LOGS/ubsan:print_stacktrace=1:halt_on_error=1" \
LD_PRELOAD="$runtime" \
  "$PY" -m pytest tests/test_cuda_emulated.py -q -p no:cacheprovider -k "not matches_cpu_kernel" "$@"
status=$?

# ASan notes once per process that it sees swapcontext (the fibers switch stacks with its
# annotations, see csrc/simt/simt.cpp): that line alone is not a report.
reports=0
for log in "$LOGS"/*; do
  [ -e "$log" ] || continue
  if grep -v "WARNING: ASan doesn't fully support makecontext/swapcontext" "$log" | grep -q .; then
    echo "==================== sanitizer report: $log"
    cat "$log"
    reports=$((reports + 1))
  fi
done
if [ $reports -gt 0 ]; then
  echo "test-cuda-asan: FAILED: $reports sanitizer report(s) above"
  exit 1
fi
echo "test-cuda-asan: no sanitizer report (pytest exit $status)"
exit $status
