#!/usr/bin/env bash
# Packaging check: the sdist and the wheel, built and installed as README's "Building" says,
# each tried from outside the source tree.
#
#   bash .ci/package_check.sh PYTHON WORK_DIR        (make package-check)
#
# 1. A plain `pip install .` (isolated build: pip's build environment has no torch) must stop
#    within seconds with the message that says to install torch and pass --no-build-isolation.
# 2. `python -m build --no-isolation` builds the sdist from a clean copy of the tree (git's
#    tracked and not-ignored files: setuptools would otherwise add whatever a stale
#    capsnet.egg-info/SOURCES.txt lists), then the wheel from the unpacked sdist alone: a header
#    or source missing from the sdist fails here.
# 3. The wheel and the sdist are installed, each into its own empty --target folder, with
#    --no-deps --no-build-isolation (the torch already installed is the one they build and
#    run against), and .ci/smoke_fused_op.py runs in WORK_DIR against each: the fused op vs
#    the reference, capsnet imported from that folder.
# WORK_DIR is emptied first; it keeps dist/, from-wheel/ and from-sdist/ for later checks
# (.ci/portability_check.sh runs on from-wheel/).
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 PYTHON WORK_DIR" >&2
    exit 2
fi
# Absolute, but not resolved: a venv's python is a symlink whose target is outside the venv.
PY="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
rm -rf "$2"
mkdir -p "$2"
WORK="$(cd "$2" && pwd)"
ISOLATED_LIMIT_S=120

timed() {  # timed LABEL COMMAND...: run, then print how long it took
    local label=$1 start=$SECONDS
    shift
    "$@"
    echo "package-check: $label: $((SECONDS - start)) s"
}

isolated_install_stops_with_instructions() {
    local log="$WORK/isolated-install.log" start=$SECONDS
    if (cd "$REPO" && "$PY" -m pip install --no-deps --target "$WORK/isolated" .) >"$log" 2>&1; then
        echo "package-check: FAILED: an isolated 'pip install .' succeeded; expected it to stop and ask for" \
             "--no-build-isolation (torch must not be fetched into pip's build environment)"
        return 1
    fi
    if ! grep -q "torch is not importable" "$log" || ! grep -q -- "--no-build-isolation" "$log"; then
        echo "package-check: FAILED: the isolated 'pip install .' failed without the expected message:"
        tail -40 "$log"
        return 1
    fi
    if ((SECONDS - start > ISOLATED_LIMIT_S)); then
        echo "package-check: FAILED: the isolated 'pip install .' took $((SECONDS - start)) s to stop" \
             "(limit ${ISOLATED_LIMIT_S} s)"
        return 1
    fi
    echo "package-check: isolated 'pip install .' stops with the instructions, as expected:"
    grep -A3 "torch is not importable" "$log" | sed 's/^/    /'
}

export_source() {  # export_source DEST: the files git tracks or would track, as they are on disk
    mkdir -p "$1"
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard) |
        while IFS= read -r -d '' path; do
            if [[ -f "$REPO/$path" ]]; then
                mkdir -p "$1/$(dirname "$path")"
                cp -p "$REPO/$path" "$1/$path"
            fi
        done
}

smoke() {  # smoke FOLDER: the smoke test from WORK_DIR, capsnet from FOLDER
    (cd "$WORK" && PYTHONPATH="$1" "$PY" smoke_fused_op.py --expect-under "$1")
}

cp "$REPO/.ci/smoke_fused_op.py" "$WORK/"
timed "isolated install check" isolated_install_stops_with_instructions
timed "clean copy of the source tree" export_source "$WORK/src"
timed "sdist, then wheel from the sdist" "$PY" -m build --no-isolation --outdir "$WORK/dist" "$WORK/src"
sdist=("$WORK"/dist/capsnet-*.tar.gz)
wheel=("$WORK"/dist/capsnet-*.whl)
echo "package-check: built $(basename "${sdist[0]}") and $(basename "${wheel[0]}")"
timed "install the wheel" "$PY" -m pip install --quiet --no-deps --no-build-isolation --target "$WORK/from-wheel" "${wheel[0]}"
timed "smoke test, wheel" smoke "$WORK/from-wheel"
timed "install the sdist (builds it)" "$PY" -m pip install --quiet --no-deps --no-build-isolation --target "$WORK/from-sdist" "${sdist[0]}"
timed "smoke test, sdist" smoke "$WORK/from-sdist"
echo "package-check: passed"
