#!/usr/bin/env bash
# Portability check: an installed capsnet imports and computes correct results on x86-64 CPUs
# narrower than the build machine, emulated by QEMU's user mode (Debian package qemu-user):
#
#   Nehalem         x86-64-v2: SSE4.2, no AVX (what any x86-64 build must run on)
#   Haswell-noTSX   AVX2 and FMA, no AVX-512
#
# A kernel compiled for instructions the CPU lacks kills the process with SIGILL at import.
#
#   bash .ci/portability_check.sh PYTHON INSTALL_DIR    (make portability-check; INSTALL_DIR
#                                                       defaults to package-check's from-wheel/)
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 PYTHON INSTALL_DIR" >&2
    exit 2
fi
PY="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CPU_MODELS=(Nehalem Haswell-noTSX)

if [[ ! -d "$2/capsnet" ]]; then
    echo "portability-check: FAILED: no installed capsnet under $2 (run 'make package-check' first)"
    exit 1
fi
TARGET="$(cd "$2" && pwd)"
if [[ "$(uname -m)" != x86_64 ]]; then
    echo "portability-check: not applicable: it emulates x86-64 CPU models, and this host is $(uname -m)"
    exit 0
fi

if ! command -v qemu-x86_64 >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "portability-check: FAILED: qemu-x86_64 is not installed and apt-get is unavailable;" \
             "install QEMU user-mode emulation (Debian/Ubuntu package qemu-user)"
        exit 1
    fi
    if [[ "$(id -u)" != 0 ]]; then
        echo "portability-check: FAILED: qemu-x86_64 is not installed; installing qemu-user needs root" \
             "(sudo apt-get install qemu-user)"
        exit 1
    fi
    echo "portability-check: installing qemu-user"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null; }; then
        echo "portability-check: FAILED: 'apt-get install qemu-user' did not succeed"
        exit 1
    fi
fi
echo "portability-check: $(qemu-x86_64 --version | head -1)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp "$REPO/.ci/smoke_fused_op.py" "$WORK/"
failed=0
for cpu in "${CPU_MODELS[@]}"; do
    echo "portability-check: (cd $WORK && PYTHONPATH=$TARGET qemu-x86_64 -cpu $cpu $PY smoke_fused_op.py --expect-under $TARGET)"
    start=$SECONDS
    set +e
    # QEMU warns about every CPUID bit of the model that it does not emulate: not our concern.
    (cd "$WORK" && PYTHONPATH="$TARGET" qemu-x86_64 -cpu "$cpu" "$PY" smoke_fused_op.py --expect-under "$TARGET") \
        2> >(grep -v "TCG doesn't support requested feature" >&2)
    rc=$?
    set -e
    if [[ $rc -eq 0 ]]; then
        echo "portability-check: $cpu: passed in $((SECONDS - start)) s"
    elif [[ $rc -eq 132 ]]; then
        echo "portability-check: $cpu: FAILED: SIGILL (exit 132): capsnet executed an instruction that a $cpu" \
             "CPU does not have (kernels compiled for the build machine, e.g. -march=native, with no" \
             "run-time choice of the kernel)"
        failed=1
    else
        echo "portability-check: $cpu: FAILED with exit status $rc"
        failed=1
    fi
done
exit $failed
