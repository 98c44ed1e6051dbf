"""scripts/gpu_check.sh (`make gpu-check`) without a GPU: its step selection (ONLY) in a dry
run, which prints the commands and runs none of the steps selected here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mnist_testing import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(out: Path, only: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DRY_RUN="1", ONLY=only, GPU_CHECK_OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_an_unknown_step_stops_before_anything_runs(tmp_path):
    result = _run(tmp_path / "out", "build tset")
    assert result.returncode == 2
    assert "unknown step 'tset'" in result.stderr
    assert "environment build tests benchmark kernels training" in result.stderr
    assert not (tmp_path / "out").exists()


def test_only_runs_the_named_steps_and_keeps_the_table(tmp_path):
    out = tmp_path / "out"
    first = _run(out, "environment tests")
    assert first.returncode == 0, first.stderr
    for skipped in ("build", "benchmark", "kernels", "training"):
        assert f"== {skipped}: not in ONLY, skipped" in first.stdout
    assert "== tests: env CUDA_LAUNCH_BLOCKING=1" in first.stdout
    (out / "steps.md").write_text((out / "steps.md").read_text() + "| tests | 0 | 1 |\n")

    second = _run(out, "training")
    assert second.returncode == 0, second.stderr
    assert "== tests: not in ONLY, skipped" in second.stdout
    table = (out / "steps.md").read_text().splitlines()
    assert table == ["| step | exit | seconds |", "|---|---|---|", "| tests | 0 | 1 |"]
