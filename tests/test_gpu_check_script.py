"""scripts/gpu_check.sh (`make gpu-check`) without a GPU: its step selection (ONLY) in a dry
run, which prints the commands and runs none of the steps selected here, and the steps it
skips when the CUDA kernels are not built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mnist_testing import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(out: Path, only: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "ONLY": only, "GPU_CHECK_OUT": str(out), "PYTHON": sys.executable, **env_vars}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_an_unknown_step_stops_before_anything_runs(tmp_path):
    result = _run(tmp_path / "out", "build tset")
    assert result.returncode == 2
    assert "unknown step 'tset'" in result.stderr
    assert "environment build tests benchmark kernels staging direct wide plans stalls training" in result.stderr
    assert not (tmp_path / "out").exists()


def test_only_runs_the_named_steps_and_keeps_the_table(tmp_path):
    out = tmp_path / "out"
    first = _run(out, "environment tests")
    assert first.returncode == 0, first.stderr
    for skipped in ("build", "benchmark", "kernels", "staging", "direct", "wide", "plans", "stalls", "training"):
        assert f"== {skipped}: not in ONLY, skipped" in first.stdout
    assert "== tests: env CUDA_LAUNCH_BLOCKING=1" in first.stdout
    (out / "steps.md").write_text((out / "steps.md").read_text() + "| tests | 0 | 1 |\n")

    second = _run(out, "training")
    assert second.returncode == 0, second.stderr
    assert "== tests: not in ONLY, skipped" in second.stdout
    table = (out / "steps.md").read_text().splitlines()
    assert table == ["| step | exit | seconds |", "|---|---|---|", "| tests | 0 | 1 |"]


def test_steps_that_need_the_kernels_are_skipped_when_they_are_not_built(tmp_path):
    """A real run (not dry) whose build failed or was cut short: the steps after it would
    only fail, spending GPU time, so each is recorded as skipped, with the reason."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['capsnet._C'] = None  # as if never built\n")
    out = tmp_path / "out"
    result = _run(out, "tests training", DRY_RUN="0", PYTHONPATH=str(site))
    assert result.returncode == 1, result.stdout + result.stderr
    for name in ("tests", "training"):
        assert f"== {name}: " in result.stdout
    assert result.stdout.count("skipped: the CUDA kernels are not built (the compiled extension capsnet._C could not be loaded (it has not been built") == 2, result.stdout
    assert not (out / "tests.log").exists() and not (out / "training").exists()
    table = (out / "steps.md").read_text().splitlines()
    assert table[2:] == [
        "| tests | skipped: CUDA kernels not built | 0 |",
        "| training | skipped: CUDA kernels not built | 0 |",
    ]
