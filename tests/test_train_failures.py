"""The failures found by probing train_mnist.py as a demanding user would (issue 10), one
test each: non-finite values and divergence, crashes between and during checkpoint writes,
leftovers and mixed runs, and every error that must be one clear line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsnet.datasets.idx import idx_bytes
from capsnet.training.checkpoint import read_checkpoint, save_checkpoint
from capsnet.training.errors import TrainingInterrupted
from capsnet.training.interrupt import StopRequest
from capsnet.training.objective import CapsNetObjective
from capsnet.training.trainer import fit
from mnist_testing import REPO, mnist_root, write_small_mnist
from training_testing import (
    assert_same_state,
    load_train_mnist,
    tiny_args,
    tiny_config,
    without_timing,
)

train_mnist = load_train_mnist()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(captured) -> str:
    """The program's error output: exactly one line, no traceback."""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and lines[0].startswith("train_mnist.py: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished one-epoch tiny run (read-only: tests copy it)."""
    out_dir = tmp_path_factory.mktemp("one_epoch")
    train_mnist.run_training(tiny_args(out_dir, "--epochs", "1"))
    return out_dir


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """Two uninterrupted epochs: what every recovered run must reproduce."""
    out_dir = tmp_path_factory.mktemp("two_epochs")
    result = train_mnist.run_training(tiny_args(out_dir, "--epochs", "2"))
    return result, out_dir


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


# --- 1. non-finite values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--lr", "inf", "--lr: must be a positive finite number, got inf"),
        ("--lr", "nan", "--lr: must be a positive finite number, got nan"),
        ("--reconstruction-weight", "inf", "--reconstruction-weight: must be a finite number >= 0"),
        ("--lr-decay", "nan", "--lr-decay: must be a number in (0, 1], got nan"),
    ],
)
def test_non_finite_option_values_are_rejected(tmp_path, capsys, option, value, message):
    out_dir = tmp_path / "run"
    assert train_mnist.main(tiny_args(out_dir, option, value)) == 2
    assert message in one_line_error(capsys.readouterr())
    assert not out_dir.exists()


def test_a_diverging_run_stops_keeps_the_last_good_checkpoint_and_resumes(
    tmp_path, capsys, monkeypatch, two_epochs
):
    # The loss turns NaN at the 3rd training step of epoch 2 (global step 9): the run must
    # stop there, exit non-zero, and leave epoch 1's checkpoints untouched.
    out_dir = tmp_path / "run"
    calls = {"training": 0}
    original = CapsNetObjective.__call__

    def poisoned(self, model, images, labels, mask="auto"):
        result = original(self, model, images, labels, mask=mask)
        if model.training:
            calls["training"] += 1
            if calls["training"] == 9:
                return result._replace(total=result.total * float("nan"))
        return result

    assert train_mnist.main(tiny_args(out_dir, "--epochs", "1")) == 0
    saved = {name: digest(out_dir / name) for name in ("last.pt", "best.pt", "metrics.csv")}
    capsys.readouterr()
    calls["training"] = 6
    monkeypatch.setattr(CapsNetObjective, "__call__", poisoned)
    argv = ["--resume", str(out_dir / "last.pt"), "--epochs", "2", "--no-progress"]
    assert train_mnist.main(argv) == 1
    error = one_line_error(capsys.readouterr())
    assert "training diverged: the training loss became NaN or infinite" in error
    assert "global step 9" in error and f"{out_dir / 'last.pt'} (end of epoch 1)" in error
    assert {name: digest(out_dir / name) for name in saved} == saved
    assert not list(out_dir.glob(".*.tmp"))

    monkeypatch.setattr(CapsNetObjective, "__call__", original)
    resumed = train_mnist.run_training(argv)  # the transient fault is gone
    expected, _ = two_epochs
    assert_same_state(expected.model.state_dict(), resumed.model.state_dict())
    assert without_timing(resumed.history) == without_timing(expected.history)


def test_a_learning_rate_that_blows_up_fails_without_saving_nan(tmp_path, capsys):
    # Before: --lr 1e6 ran to exit 0 with NaN weights in last.pt and best.pt ("best test
    # accuracy 9.38%"). Since squash is exact at any magnitude, 1e6 (and up to ~1e14) trains
    # a finite, saturated network instead; 1e20 still overflows, within the first epoch.
    # (A divergence after a checkpoint exists: the monkeypatched test above.)
    out_dir = tmp_path / "run"
    assert train_mnist.main(tiny_args(out_dir, "--epochs", "3", "--lr", "1e20")) == 1
    error = one_line_error(capsys.readouterr())
    assert "training diverged" in error and "epoch 1" in error and "no checkpoint was written" in error
    assert not (out_dir / "last.pt").exists() and not (out_dir / "best.pt").exists()
    assert not list(out_dir.glob(".*.tmp"))


def test_non_finite_optimizer_state_is_never_saved(tmp_path, capsys):
    # A huge reconstruction weight overflows Adam's second moments to infinity while the
    # loss stays finite: the check before saving catches it.
    out_dir = tmp_path / "run"
    argv = tiny_args(out_dir, "--epochs", "1", "--lr", "10", "--reconstruction-weight", "1e30")
    assert train_mnist.main(argv) == 1
    error = one_line_error(capsys.readouterr())
    assert "training diverged" in error and "no checkpoint was written yet" in error
    assert not (out_dir / "last.pt").exists() and not (out_dir / "best.pt").exists()


def test_a_checkpoint_with_nan_weights_does_not_resume(tmp_path, capsys, one_epoch):
    out_dir = copy_run(one_epoch, tmp_path / "run")
    state = torch.load(out_dir / "last.pt", weights_only=True)
    state["model"]["conv1.weight"][0, 0, 0, 0] = float("nan")
    save_checkpoint(state, out_dir / "last.pt")
    assert train_mnist.main(["--resume", str(out_dir / "last.pt"), "--epochs", "2"]) == 2
    error = one_line_error(capsys.readouterr())
    assert "conv1.weight holds NaN or infinity" in error and "saved after the run diverged" in error


# --- 2. a crash at any instant of the end-of-epoch writes ------------------------------------------

KILL_WORKER = """
import importlib.util, os, signal, sys
target, moment = sys.argv[1], sys.argv[2]
real_replace = os.replace

def replace(source, destination):
    if os.path.basename(destination) == target:
        if moment == "after":
            real_replace(source, destination)
        os.kill(os.getpid(), signal.SIGKILL)  # "before": the temporary file is written, not published
    return real_replace(source, destination)

os.replace = replace
spec = importlib.util.spec_from_file_location("train_mnist", sys.argv[3])
train_mnist = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_mnist)
sys.exit(train_mnist.main(sys.argv[4:]))
"""


def run_killed(tmp_path: Path, argv: list[str], target: str, moment: str) -> None:
    worker = tmp_path / "kill_worker.py"
    worker.write_text(KILL_WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    completed = subprocess.run(
        [sys.executable, str(worker), target, moment, str(REPO / "train_mnist.py"), *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == -signal.SIGKILL, completed.stdout + completed.stderr


@pytest.mark.parametrize(
    "target, moment",
    [
        ("best.pt", "after"),  # best.pt of epoch 1 published, last.pt never written
        ("last.pt", "after"),  # both published, the logs not yet
        pytest.param("best.pt", "before", marks=pytest.mark.slow),  # killed inside best.pt's write
        pytest.param("last.pt", "before", marks=pytest.mark.slow),  # killed inside last.pt's write
    ],
)
@pytest.mark.timeout(600)
def test_sigkill_at_a_checkpoint_write_leaves_a_run_that_continues_exactly(
    tmp_path, capsys, two_epochs, target, moment
):
    out_dir = tmp_path / "run"
    run_killed(tmp_path, tiny_args(out_dir, "--epochs", "2"), target, moment)
    resumable = (out_dir / "last.pt").exists() or (out_dir / "best.pt").exists()
    if resumable:
        argv = ["--resume", str(out_dir / "last.pt"), "--epochs", "2", "--no-progress"]
    else:  # killed before any checkpoint existed: the same command starts again
        argv = tiny_args(out_dir, "--epochs", "2")
    assert train_mnist.main(argv) == 0
    printed = capsys.readouterr().out
    expected, expected_dir = two_epochs
    best = read_checkpoint(out_dir / "best.pt")
    last = read_checkpoint(out_dir / "last.pt")
    assert last.best_epoch == best.epoch == expected.best.epoch  # the pair agrees
    assert f"at epoch {best.epoch} " in printed  # and so does the summary
    assert_same_state(expected.model.state_dict(), last.state["model"])
    assert without_timing(last.state["history"]) == without_timing(expected.history)
    assert not list(out_dir.glob(".*.tmp")), "temporary files of the killed write remain"
    assert (out_dir / "metrics.csv").read_text() .count("\n") == 3


def test_resume_uses_a_best_checkpoint_newer_than_last(tmp_path, capsys, two_epochs):
    # A crash after best.pt (epoch 2) was published but before last.pt (still epoch 1) was.
    expected, expected_dir = two_epochs
    out_dir = copy_run(expected_dir, tmp_path / "run")
    state = torch.load(expected_dir / "last.pt", weights_only=True)
    record = state["history"][1]
    state["history"][0]["test_accuracy"] = min(record["test_accuracy"] - 0.01, 0.0)
    state["best_epoch"], state["best_test_accuracy"] = 2, record["test_accuracy"]
    save_checkpoint(state, out_dir / "best.pt")  # epoch 2 is "the best" here
    older = torch.load(expected_dir / "best.pt", weights_only=True)  # epoch 1
    older["history"][0]["test_accuracy"] = state["history"][0]["test_accuracy"]
    older["best_test_accuracy"] = older["history"][0]["test_accuracy"]
    save_checkpoint(older, out_dir / "last.pt")
    assert train_mnist.main(["--resume", str(out_dir / "last.pt"), "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "is newer than" in printed and "nothing to do" in printed
    assert digest(out_dir / "last.pt") == digest(out_dir / "best.pt")


def test_resume_restores_a_best_checkpoint_lost_before_this_version(tmp_path, capsys, one_epoch):
    # The old write order (last.pt, then best.pt) and a crash between: last.pt records epoch 1
    # as the best, best.pt does not exist. Resuming restores it instead of reporting a best
    # epoch that is not on disk.
    out_dir = copy_run(one_epoch, tmp_path / "run")
    (out_dir / "best.pt").unlink()
    argv = ["--resume", str(out_dir / "last.pt"), "--epochs", "2", "--no-progress"]
    assert train_mnist.main(argv) == 0
    printed = capsys.readouterr().out
    best = read_checkpoint(out_dir / "best.pt")
    last = read_checkpoint(out_dir / "last.pt")
    assert best.epoch == last.best_epoch
    assert f"at epoch {best.epoch} " in printed


# --- 3. leftovers and mixed runs ------------------------------------------------------------------


def test_temporary_files_of_killed_writes_are_removed_on_resume(tmp_path, capsys, one_epoch):
    out_dir = copy_run(one_epoch, tmp_path / "run")
    leftovers = [out_dir / ".last.pt.k2j3h4.tmp", out_dir / ".best.pt.abc_12.tmp",
                 out_dir / "reconstructions" / ".epoch_001.png.x1y2z3.tmp"]  # fmt: skip
    for path in leftovers:
        path.write_bytes(b"\0" * 1000)
    keep = out_dir / "notes.tmp"  # not ours
    keep.write_text("mine")
    argv = ["--resume", str(out_dir / "last.pt"), "--epochs", "2", "--no-progress"]
    assert train_mnist.main(argv) == 0
    assert not any(path.exists() for path in leftovers)
    assert keep.read_text() == "mine"
    assert "removed 3 temporary file(s)" in capsys.readouterr().out


def test_overwrite_deletes_the_earlier_runs_files_before_the_new_run_starts(
    tmp_path, caplog, one_epoch
):
    out_dir = copy_run(one_epoch, tmp_path / "run")
    old_files = {path for path in out_dir.rglob("*") if path.is_file() and path.name != ".lock"}
    stop = StopRequest()

    def stop_at_once(position):  # interrupt the new run in its first epoch
        stop.request("test")

    config = tiny_config(out_dir, epochs=2, seed=1)
    with pytest.raises(TrainingInterrupted), caplog.at_level("INFO", "capsnet.training"):
        fit(config, overwrite=True, stop=stop, on_step=stop_at_once)
    names = {path.name for path in out_dir.iterdir() if path.name != ".lock"}
    # The new run's config and checkpoint (and its TensorBoard events, when installed) only.
    assert names - {"tensorboard"} == {"config.json", "last.pt"}
    survivors = {p for p in old_files if p.exists() and p.name not in ("config.json", "last.pt")}
    assert not survivors, survivors
    assert read_checkpoint(out_dir / "last.pt").config.seed == 1
    assert any("--overwrite: deleted the earlier run's" in r.getMessage() for r in caplog.records)


def test_a_new_run_refuses_a_directory_with_any_file_of_another_run(tmp_path, capsys, one_epoch):
    out_dir = copy_run(one_epoch, tmp_path / "run")
    for name in ("last.pt", "best.pt", "config.json"):
        (out_dir / name).unlink()  # what remains: metrics.csv, curves, reconstructions
    assert train_mnist.main(tiny_args(out_dir, "--epochs", "1")) == 2
    error = one_line_error(capsys.readouterr())
    assert "already holds a run (metrics.csv" in error and "--overwrite" in error


def test_a_run_stopped_before_its_first_checkpoint_can_be_started_again(tmp_path):
    out_dir = tmp_path / "run"
    (out_dir / "tensorboard").mkdir(parents=True)
    stale_events = out_dir / "tensorboard" / "events.out.tfevents.1.old"
    stale_events.write_bytes(b"old")
    (out_dir / "config.json").write_text("{}")
    assert train_mnist.main(tiny_args(out_dir, "--epochs", "1", "--limit-train", "32")) == 0
    assert not stale_events.exists()
    assert json.loads((out_dir / "config.json").read_text())["limit_train"] == 32


# --- 4. errors that must be one clear line --------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("train-images-idx3-ubyte", lambda good: b"\x1f\x8b" + good[2:], "magic number 0x1f8b"),
        ("train-images-idx3-ubyte", lambda good: good[: len(good) // 2], "is truncated"),
        ("train-images-idx3-ubyte", lambda good: b"", "is empty (0 bytes)"),
        ("train-images-idx3-ubyte", lambda good: good[:8] + (20).to_bytes(4, "big") + good[12:],
         "bytes after the 40x20x28 array its header announces"),
        ("train-images-idx3-ubyte", lambda good: idx_bytes(torch.zeros(40, 20, 28, dtype=torch.uint8)),
         "holds 20x28 images, expected MNIST's 28x28"),
        ("t10k-labels-idx1-ubyte", lambda good: good[:-1], "is truncated"),
        ("train-labels-idx1-ubyte", lambda good: good[:4] + (39).to_bytes(4, "big") + good[8:-1],
         "holds 40 images but"),
        ("train-labels-idx1-ubyte", lambda good: good[:-1] + b"\x0b", "has label 11 at index 39"),
    ],
)  # fmt: skip
def test_damaged_mnist_files_are_one_line_naming_the_file(tmp_path, capsys, name, content, message):
    raw = write_small_mnist(tmp_path / "data")
    (raw / name).write_bytes(content((raw / name).read_bytes()))
    argv = ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
            "--no-progress", "--routing", "reference"]  # fmt: skip
    assert train_mnist.main(argv) == 2
    error = one_line_error(capsys.readouterr())
    assert message in error and str(raw / name) in error


class FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes, like a full file system."""

    def __init__(self, file, room: int) -> None:
        self._file = file
        self._room = room

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self._file.__exit__(*exc_info)


def test_a_full_disk_names_the_file_and_keeps_its_previous_version(
    tmp_path, capsys, monkeypatch, one_epoch
):
    out_dir = copy_run(one_epoch, tmp_path / "run")
    before = digest(out_dir / "last.pt")
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        file = real_fdopen(fd, *args, **kwargs)
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            return FullDisk(file, room=1 << 20)
        return file

    monkeypatch.setattr(os, "fdopen", fdopen)
    argv = ["--resume", str(out_dir / "last.pt"), "--epochs", "2", "--no-progress"]
    assert train_mnist.main(argv) == 1
    error = one_line_error(capsys.readouterr())
    assert f"could not write {out_dir / 'last.pt'}: no space left on device" in error
    assert "previous version is intact" in error
    assert digest(out_dir / "last.pt") == before
    assert not list(out_dir.glob(".*.tmp"))


def test_out_dir_problems_are_reported_before_loading_data(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    nowhere = ["--data-dir", str(tmp_path / "no_data")]  # would fail if data came first
    for out_dir, message in (
        (afile, f"--out-dir {afile} is a file, not a directory"),
        (afile / "run", f"{afile} is a file, not a directory"),
    ):
        assert train_mnist.main([*nowhere, "--out-dir", str(out_dir)]) == 2
        assert message in one_line_error(capsys.readouterr())


def test_an_out_dir_that_is_not_writable_is_reported_before_loading_data(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK) and os.geteuid() == 0:
            # root writes through permission bits: make the directory immutable instead.
            if shutil.which("chattr") is None or subprocess.run(
                ["chattr", "+i", str(locked)], capture_output=True
            ).returncode:
                pytest.skip("running as root on a file system without chattr +i")
        argv = ["--data-dir", str(tmp_path / "no_data"), "--out-dir", str(locked / "run")]
        assert train_mnist.main(argv) == 2
        error = one_line_error(capsys.readouterr())
        assert f"--out-dir {locked / 'run'} is not writable" in error
    finally:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        locked.chmod(0o755)


def _corrupt(state: dict, case: str) -> object:
    """One way a checkpoint can load but not fit (or not load at all)."""
    if case == "config is a list":
        state["train_config"] = [1, 2]
    elif case == "unknown config field":
        state["train_config"]["dropout"] = 0.5
    elif case == "bad config value":
        state["train_config"]["lr"] = -1.0
    elif case == "unknown model field":
        state["train_config"]["model"]["width"] = 3
    elif case == "weights of another network":
        state["train_config"]["model"]["routing_iterations"] = 2
        state["train_config"]["model"]["input_shape"] = [1, 36, 36]
    elif case == "missing weight":
        del state["model"]["conv1.bias"]
    elif case == "weight of wrong shape":
        state["model"]["conv1.bias"] = torch.zeros(3)
    elif case == "optimizer state of wrong shape":
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2)
    elif case == "optimizer without groups":
        state["optimizer"] = {"state": {}}
    elif case == "optimizer state for a missing parameter":
        state["optimizer"]["state"][99] = {"step": torch.tensor(1.0)}
    elif case == "optimizer lr not a number":
        state["optimizer"]["param_groups"][0]["lr"] = "fast"
    elif case == "scheduler of another kind":
        state["scheduler"] = {"milestones": [1]}
    elif case == "bad rng state":
        state["rng"] = {"torch_cpu": torch.zeros(3, dtype=torch.uint8)}
    elif case == "epoch not an int":
        state["epoch"] = 1.5
    elif case == "negative step":
        state["global_step"] = -1
    elif case == "history not a list":
        state["history"] = {"1": 0.5}
    elif case == "history shorter than the epochs":
        state["history"] = []
    elif case == "best epoch out of range":
        state["best_epoch"] = 7
    elif case == "step log of wrong width":
        state["step_log"] = torch.zeros(3, 2, dtype=torch.float64)
    elif case == "world size zero":
        state["world_size"] = 0
    elif case == "future format":
        state["format_version"] = 9
    elif case == "no format":
        del state["format_version"]
    elif case == "not a dict":
        return [1, 2, 3]
    return state


# Evaluation reads the settings and the weights only; these do not stop it.
RESUME_ONLY = {
    "optimizer state of wrong shape",
    "optimizer state for a missing parameter",
    "optimizer lr not a number",
    "scheduler of another kind",
    "step log of wrong width",
}
CORRUPTIONS = {
    "config is a list": "train_config must be a dict",
    "unknown config field": "train_config: dropout is not a TrainConfig field",
    "bad config value": "train_config: lr must be a positive finite number, got -1.0",
    "unknown model field": "train_config: model.width is not a CapsNetConfig field",
    "weights of another network": "digit_caps.weight has shape (1152, 10, 16, 8), the network needs (3200, 10, 16, 8)",
    "missing weight": "missing ['conv1.bias']",
    "weight of wrong shape": "conv1.bias has shape (3,), the network needs (256,)",
    "optimizer state of wrong shape": "exp_avg of parameter 0 has shape (2,)",
    "optimizer without groups": "optimizer must be a state dict with 'state' and 'param_groups'",
    "optimizer state for a missing parameter": "state for parameter 99 does not exist",
    "optimizer lr not a number": "param_groups 'lr' must be a finite number, got 'fast'",
    "scheduler of another kind": "scheduler has keys ['milestones']",
    "bad rng state": "rng['torch_cpu'] is not a CPU random generator state",
    "epoch not an int": "epoch must be an int >= 0, got 1.5",
    "negative step": "global_step must be an int >= 0, got -1",
    "history not a list": "history must be a list",
    "history shorter than the epochs": "history has 0 records for 1 finished epochs",
    "best epoch out of range": "best_epoch must be an epoch in 1..1 or None, got 7",
    "step log of wrong width": "step_log must be a float [steps, 5] tensor",
    "world size zero": "world_size must be an int >= 1, got 0",
    "future format": "has checkpoint format 9; this capsnet reads formats 1, 2",
    "no format": "is not a capsnet training checkpoint: no format_version",
    "not a dict": "is not a capsnet training checkpoint (it holds a list, not a dict)",
}  # fmt: skip


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_an_inconsistent_checkpoint_is_one_line_naming_the_problem(
    tmp_path, capsys, one_epoch, case
):
    out_dir = copy_run(one_epoch, tmp_path / "run")
    state = torch.load(out_dir / "last.pt", weights_only=True)
    path = out_dir / "last.pt"
    torch.save(_corrupt(state, case), path)
    before = digest(path)
    assert train_mnist.main(["--resume", str(path), "--epochs", "2", "--no-progress"]) == 2
    error = one_line_error(capsys.readouterr())
    assert CORRUPTIONS[case] in error and str(path) in error
    assert digest(path) == before
    evaluation = train_mnist.main(["--eval", str(path), "--no-progress", "--limit-test", "8"])
    captured = capsys.readouterr()
    if case in RESUME_ONLY:
        assert evaluation == 0 and "test accuracy" in captured.out
    else:
        assert evaluation == 2 and CORRUPTIONS[case] in one_line_error(captured)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda path: path.write_bytes(b""), "is empty (0 bytes)"),
        (lambda path: path.write_text("101\n"), "is not a file written by torch.save"),
        (lambda path: path.write_bytes(path.with_name("best.pt").read_bytes()[:5000]),
         "is damaged or not a torch.save file"),
        (lambda path: path.mkdir(), "is a directory, not a checkpoint file"),
        (lambda path: None, "does not exist"),
    ],
)  # fmt: skip
def test_an_unreadable_checkpoint_is_one_line_naming_the_problem(
    tmp_path, capsys, one_epoch, make, message
):
    out_dir = copy_run(one_epoch, tmp_path / "run")
    path = out_dir / "broken.pt"
    make(path)
    for option in ("--resume", "--eval"):
        assert train_mnist.main([option, str(path)]) == 2
        error = one_line_error(capsys.readouterr())
        assert message in error and str(path) in error


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--limit-test", "0"], "--limit-test: must be an int >= 1, got 0"),
        (["--eval-batch-size", "0"], "--eval-batch-size: must be an int >= 1, got 0"),
        (["--device", "tpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["--image-size", "36"], "--image-size: cannot change when evaluating"),
        (["--no-reconstruction"], "--reconstruction: cannot change when evaluating"),
    ],
)
def test_bad_evaluation_options_name_the_option(capsys, one_epoch, extra, message):
    assert train_mnist.main(["--eval", str(one_epoch / "last.pt"), *extra]) == 2
    assert message in one_line_error(capsys.readouterr())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "20"], "--image-size: mnist images are 1x28x28"),
        (["--image-size", "8"], "--image-size: (1, 8, 8) is too small: Conv1 (9x9) and PrimaryCaps"),
        (["--routing-iterations", "0"], "--routing-iterations: must be a positive int, got 0"),
        (["--batch-size", "-3"], "--batch-size: must be an int >= 1, got -3"),
    ],
)
def test_bad_training_options_name_the_option(tmp_path, capsys, extra, message):
    assert train_mnist.main(tiny_args(tmp_path / "run", *extra)) == 2
    assert message in one_line_error(capsys.readouterr())


def test_help_shows_boolean_defaults_the_way_they_read(capsys):
    with pytest.raises(SystemExit):
        train_mnist.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: True)" not in text and "(default: False)" not in text
    assert "--progress, --no-progress progress bars (default: on)" in text
    assert "--reconstruction, --no-reconstruction reconstruction decoder" in text
    assert "--amp, --no-amp mixed precision" in text and "(default: off)" in text


def test_old_options_still_parse(tmp_path):
    args = train_mnist.parse_args(
        ["--no-progress", "--no-reconstruction", "--capsule-bias", "--amp", "--download",
         "--routing", "reference", "--image-size", "36", "--overwrite"]  # fmt: skip
    )
    assert args.progress is False and args.__dict__["model.reconstruction"] is False
    assert args.__dict__["model.capsule_bias"] is True and args.amp and args.download
    assert args.overwrite
