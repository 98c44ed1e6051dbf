"""benchmarks/stall_profile.py (make gpu-check's `stalls` step) without a GPU: reading ncu's
raw CSV, and what it writes when the machine has no ncu."""

from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import stall_profile  # noqa: E402

# The shape of `ncu --page raw --csv` output: ncu's messages, the metric names, their units,
# a row per kernel (values with thousands separators, as ncu prints them).
RAW = '''==PROF== Connected to process 123
"ID","Kernel Name","gpu__time_duration.sum","smsp__average_warp_latency_per_inst_issued.ratio","sm__warps_active.avg.pct_of_peak_sustained_active","smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"
"","","nsecond","","%","inst","inst","inst"
"0","forward_iteration_kernel<float, capsnet::cuda::CapsNetTile, capsnet::cuda::ForwardStep::kLater, 3>(capsnet::cuda::ForwardParams<float>)","57,912","21.4","14.9","3.2","11.8","1.1"
"1","gradient_kernel<float, capsnet::cuda::CapsNetTile, 4>(capsnet::cuda::BackwardParams<float>)","140,480","35.0","15.5","24.7","2.0","n/a"
'''


def test_the_raw_csv_gives_each_kernels_duration_and_largest_stalls():
    kernels, units = stall_profile.parse_raw_csv(RAW)
    assert len(kernels) == 2 and units["gpu__time_duration.sum"] == "nsecond"
    forward, gradient = (stall_profile.summarize(k, units, top=2) for k in kernels)
    assert forward["kernel"] == "forward_iteration_kernel<kLater, staged>"
    assert forward["duration_us"] == pytest.approx(57.912)
    assert forward["cycles_per_issue"] == pytest.approx(21.4) and forward["occupancy_pct"] == pytest.approx(14.9)
    assert forward["stalls"] == [("barrier", 11.8), ("long_scoreboard", 3.2)]  # largest first, `top` of them
    assert gradient["kernel"] == "gradient_kernel<narrow>"
    assert gradient["stalls"] == [("long_scoreboard", 24.7), ("barrier", 2.0)]  # "n/a" left out
    table = stall_profile.format_summary(128, [forward, gradient])
    assert "| gradient_kernel<narrow> | 140.5 | 35.0 | 15.5 | long_scoreboard 24.7, barrier 2.0 |" in table


def test_a_duration_in_an_unknown_unit_is_not_guessed():
    kernels, units = stall_profile.parse_raw_csv(RAW.replace('"nsecond"', '"cycle"'))
    assert stall_profile.summarize(kernels[0], units)["duration_us"] is None


def test_no_ncu_output_gives_no_kernels():
    assert stall_profile.parse_raw_csv("==PROF== ERR_NVGPUCTRPERM\n") == ([], {})


def test_without_ncu_the_step_says_so_and_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(stall_profile, "find_ncu", lambda: None)
    assert stall_profile.main(["--out", str(tmp_path)]) == 0
    assert "Not collected: ncu not found" in (tmp_path / "stalls.md").read_text()


def _fake_ncu(tmp_path, body: str) -> str:
    """An executable standing in for ncu: `body` runs with $LOG set to --log-file's path."""
    script = tmp_path / "ncu"
    script.write_text('#!/bin/bash\nLOG=\nwhile [ $# -gt 0 ]; do [ "$1" = --log-file ] && LOG=$2; shift; done\n' + body)
    script.chmod(0o755)
    return str(script)


def test_the_step_writes_ncus_kernels_per_batch_size(tmp_path, monkeypatch):
    (tmp_path / "raw.csv").write_text(RAW)
    monkeypatch.setattr(stall_profile, "find_ncu", lambda: _fake_ncu(tmp_path, f'cp {tmp_path / "raw.csv"} "$LOG"\n'))
    out = tmp_path / "out"
    assert stall_profile.main(["--out", str(out), "--batch-sizes", "32", "128"]) == 0
    text = (out / "stalls.md").read_text()
    assert "### B = 32" in text and "### B = 128" in text
    assert text.count("| forward_iteration_kernel<kLater, staged> | 57.9 |") == 2
    assert (out / "stalls-B128.csv").read_text() == RAW


def test_counters_ncu_may_not_read_are_reported_not_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(stall_profile, "find_ncu", lambda: _fake_ncu(tmp_path, 'echo "==ERROR== ERR_NVGPUCTRPERM - no permission" >&2\nexit 1\n'))
    assert stall_profile.main(["--out", str(tmp_path / "out"), "--batch-sizes", "128"]) == 0
    assert "ncu cannot read the performance counters (ERR_NVGPUCTRPERM) (exit 1)" in (tmp_path / "out" / "stalls.md").read_text()
