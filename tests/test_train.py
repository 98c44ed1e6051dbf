"""train_mnist.py end to end on real MNIST: learning, outputs, checkpoints, exact resume
(at an epoch boundary, mid-epoch, after a real Ctrl-C), the errors a user sees before a
run starts, and the fused and reference backends following the same trajectory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from capsnet import _extension
from capsnet.datasets import load_mnist, random_shift, step_generator
from capsnet.losses import capsnet_loss
from capsnet.model import CapsNet, CapsNetConfig
from capsnet.training.checkpoint import model_from_checkpoint, read_checkpoint
from capsnet.training.config import TrainConfig
from capsnet.training.errors import TrainingInterrupted
from capsnet.training.evaluation import evaluate_checkpoint
from capsnet.training.interrupt import StopRequest
from capsnet.training.metrics import HISTORY_COLUMNS
from capsnet.training.trainer import fit
from mnist_testing import REPO, mnist_root
from training_testing import (
    ROUTING,
    TINY_STEPS_PER_EPOCH,
    assert_same_optimizer_state,
    assert_same_state,
    load_train_mnist,
    tiny_args,
    tiny_config,
    without_timing,
)

train_mnist = load_train_mnist()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Two uninterrupted epochs of the tiny run: the baseline every resume must reproduce."""
    out_dir = tmp_path_factory.mktemp("straight")
    result = train_mnist.run_training(tiny_args(out_dir, "--epochs", "2"))
    return result, out_dir


# --- learning -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_short_run_lowers_the_loss_and_learns_mnist(tmp_path, capsys):
    # 2 epochs of the first 2,048 training images in steps of 32 (128 steps), tested on the
    # first 1,000 test images. Measured on the 2-core development machine, with the fused and
    # with the reference backend alike: 92.7% (seed 0) and 94.1% (seed 1) test accuracy;
    # train loss 0.47 -> 0.18, test loss 0.21 -> 0.12; about 30 s (fused) or 40 s
    # (reference) on an idle machine. The threshold leaves room for other CPUs' rounding;
    # chance is 10%.
    out_dir = tmp_path / "short"
    argv = [
        "--data-dir", str(mnist_root()),
        "--routing", ROUTING,
        "--limit-train", "2048",
        "--limit-test", "1000",
        "--batch-size", "32",
        "--epochs", "2",
        "--no-progress",
        "--out-dir", str(out_dir),
    ]  # fmt: skip
    assert train_mnist.main(argv) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/2" in printed and "epoch 2/2" in printed and "best test accuracy" in printed

    rows = (out_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == list(HISTORY_COLUMNS)
    assert len(rows) == 3
    history = read_checkpoint(out_dir / "last.pt").state["history"]
    first, second = history
    assert second["train_loss"] < first["train_loss"]
    assert second["test_loss"] < first["test_loss"]
    assert second["test_margin_loss"] < first["test_margin_loss"]
    assert second["test_accuracy"] >= 0.80, (
        f"test accuracy {second['test_accuracy']:.3f} after the short run"
    )
    assert second["lr"] == pytest.approx(0.9 * first["lr"])  # per-epoch exponential decay
    steps = (out_dir / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 128 and steps[-1].startswith("128,2.0,")
    for name in ("best.pt", "last.pt", "config.json", "curves.png", "reconstructions/epoch_001.png",
                 "reconstructions/epoch_002.png"):  # fmt: skip
        assert (out_dir / name).is_file(), name
    assert not list(out_dir.glob(".*.tmp")), "temporary files left behind"


# --- checkpoints ----------------------------------------------------------------------------------


def test_checkpoint_round_trip(straight_run, capsys):
    result, out_dir = straight_run
    raw = torch.load(out_dir / "last.pt", weights_only=True)  # no arbitrary unpickling
    for key in ("model", "optimizer", "scheduler", "train_config", "epoch", "global_step",
                "history", "rng", "step_log", "best_epoch", "format_version"):  # fmt: skip
        assert key in raw, key
    assert raw["format_version"] == 2
    assert raw["epoch"] == 2 and raw["batch_in_epoch"] == 0 and raw["global_step"] == 12
    assert raw["step_log"].shape == (12, 5) and raw["step_log"][:, 0].tolist() == list(range(1, 13))
    saved = TrainConfig.from_dict(raw["train_config"])
    assert saved.limit_train == 96 and saved.routing == ROUTING
    assert "routing_backend" not in raw["train_config"]["model"]  # an execution choice

    model = model_from_checkpoint(out_dir / "last.pt")
    assert_same_state(result.model.state_dict(), model.state_dict())
    metrics = evaluate_checkpoint(
        out_dir / "last.pt", data_dir=str(mnist_root()), device="cpu", limit_test=32, progress=False
    )
    assert metrics["accuracy"] == pytest.approx(result.history[-1]["test_accuracy"])
    assert metrics["loss"] == pytest.approx(result.history[-1]["test_loss"], rel=1e-5)

    argv = ["--eval", str(out_dir / "last.pt"), "--data-dir", str(mnist_root()),
            "--limit-test", "32", "--no-progress"]  # fmt: skip
    assert train_mnist.main(argv) == 0
    expected = f"test accuracy {100 * result.history[-1]['test_accuracy']:.2f}%"
    assert expected in capsys.readouterr().out


def test_best_checkpoint_holds_the_best_epoch(straight_run):
    result, out_dir = straight_run
    best = read_checkpoint(out_dir / "best.pt")
    best_record = max(result.history, key=lambda record: record["test_accuracy"])
    assert best.state["best_test_accuracy"] == best_record["test_accuracy"]
    assert best.state["best_epoch"] == best.epoch == best_record["epoch"] == result.best.epoch
    assert best.state["history"][-1] == best_record
    last = read_checkpoint(out_dir / "last.pt")
    assert last.state["best_epoch"] == best_record["epoch"]


def test_resume_at_an_epoch_boundary_is_exact(straight_run, tmp_path):
    result, _ = straight_run
    out_dir = tmp_path / "split"
    train_mnist.run_training(tiny_args(out_dir, "--epochs", "1"))
    resumed = train_mnist.run_training(
        ["--resume", str(out_dir / "last.pt"), "--epochs", "2", "--no-progress"]
    )
    assert_same_state(result.model.state_dict(), resumed.model.state_dict())
    assert without_timing(resumed.history) == without_timing(result.history)
    straight_ckpt = read_checkpoint(straight_run[1] / "last.pt").state
    resumed_ckpt = read_checkpoint(out_dir / "last.pt").state
    assert_same_optimizer_state(straight_ckpt["optimizer"], resumed_ckpt["optimizer"])
    assert straight_ckpt["scheduler"] == resumed_ckpt["scheduler"]
    assert torch.equal(straight_ckpt["step_log"], resumed_ckpt["step_log"])
    assert len((out_dir / "metrics.csv").read_text().splitlines()) == 3
    assert (out_dir / "steps.csv").read_text() == (straight_run[1] / "steps.csv").read_text()


def test_resume_mid_epoch_is_exact(straight_run, tmp_path):
    result, _ = straight_run
    out_dir = tmp_path / "interrupted"
    stop = StopRequest()

    def stop_after_step_8(position):  # epoch 2 (index 1), its 2nd step: 6 steps per epoch
        if position.global_step == 8:
            stop.request("test")

    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny_config(out_dir, epochs=2), stop=stop, on_step=stop_after_step_8)
    assert info.value.checkpoint_path == out_dir / "last.pt"
    saved = read_checkpoint(out_dir / "last.pt")
    assert (saved.epoch, saved.batch_in_epoch, saved.global_step) == (1, 2, 8)
    assert saved.state["epoch_sums"]["count"] == 32
    assert saved.state["step_log"].shape[0] == 8

    resumed = fit(tiny_config(out_dir, epochs=2), resume=out_dir / "last.pt")
    assert_same_state(result.model.state_dict(), resumed.model.state_dict())
    # The interrupted epoch's averages include the steps before the interruption.
    assert without_timing(resumed.history) == without_timing(result.history)
    straight_log = read_checkpoint(straight_run[1] / "last.pt").state["step_log"]
    assert torch.equal(read_checkpoint(out_dir / "last.pt").state["step_log"], straight_log)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path):
    out_dir = tmp_path / "ctrl_c"
    # Far more epochs than it will get through: the Ctrl-C always finds it training.
    args = tiny_args(out_dir, "--epochs", "1000")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train_mnist.py"), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        header = process.stdout.readline()  # logged once the Ctrl-C handler is installed
        if not header.startswith("CapsNet on mnist:"):
            process.kill()  # before reading stderr, which would otherwise wait for 1000 epochs
            pytest.fail(f"unexpected first line {header!r}; stderr: {process.communicate()[1]}")
        time.sleep(1.5)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "SIGINT received" in stderr and "--resume" in stderr
    saved = read_checkpoint(out_dir / "last.pt")
    epochs = saved.epoch + 1  # finish the epoch it was stopped in
    assert saved.global_step == TINY_STEPS_PER_EPOCH * saved.epoch + saved.batch_in_epoch

    # Finishing the interrupted run gives what one uninterrupted run gives.
    resumed = train_mnist.run_training(
        ["--resume", str(out_dir / "last.pt"), "--epochs", str(epochs), "--no-progress"]
    )
    straight = train_mnist.run_training(tiny_args(tmp_path / "straight", "--epochs", str(epochs)))
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert without_timing(resumed.history) == without_timing(straight.history)


def test_resume_refuses_changed_training_settings(straight_run, capsys):
    _, out_dir = straight_run
    argv = ["--resume", str(out_dir / "last.pt"), "--epochs", "3", "--lr", "0.01", "--no-progress"]
    assert train_mnist.main(argv) == 2
    error = capsys.readouterr().err
    assert "cannot resume" in error and "lr: checkpoint 0.001, requested 0.01" in error


def test_resume_of_a_finished_run_does_nothing_and_writes_nothing(straight_run, capsys):
    _, out_dir = straight_run
    files = ("last.pt", "best.pt", "config.json", "metrics.csv", "curves.png")
    before = {name: (out_dir / name).stat().st_mtime_ns for name in files}
    config_before = (out_dir / "config.json").read_text()
    for extra in ([], ["--epochs", "1"]):  # --epochs below the epochs done changes nothing
        assert train_mnist.main(["--resume", str(out_dir / "last.pt"), "--no-progress", *extra]) == 0
        printed = capsys.readouterr().out
        assert "already trained 2 epoch(s)" in printed and "nothing to do" in printed
        assert "epoch 3" not in printed and "step 0" not in printed
    assert {name: (out_dir / name).stat().st_mtime_ns for name in files} == before
    assert (out_dir / "config.json").read_text() == config_before
    assert json.loads(config_before)["epochs"] == 2


# --- errors a user sees before a run starts -------------------------------------------------------


def test_missing_data_set_is_a_clear_error(tmp_path, capsys):
    argv = ["--data-dir", str(tmp_path / "nowhere"), "--routing", "reference",
            "--out-dir", str(tmp_path / "out")]  # fmt: skip
    assert train_mnist.main(argv) == 2
    error = capsys.readouterr().err
    assert (
        "MNIST not found" in error and str(tmp_path / "nowhere") in error and "--download" in error
    )


def test_fused_routing_without_the_extension_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_extension, "has_kernel", lambda device_type, dtype: False)
    argv = ["--data-dir", str(mnist_root()), "--out-dir", str(tmp_path)]  # default --routing fused
    assert train_mnist.main(argv) == 2
    error = capsys.readouterr().err
    assert (
        "--routing fused needs the compiled routing kernel" in error
        and "--routing reference" in error
    )


def test_a_new_run_does_not_overwrite_an_earlier_one(straight_run, capsys):
    _, out_dir = straight_run
    before = (out_dir / "last.pt").stat().st_mtime_ns
    assert train_mnist.main(tiny_args(out_dir, "--epochs", "1")) == 2
    error = capsys.readouterr().err
    assert "already holds a run" in error and "--resume" in error and "--overwrite" in error
    assert (out_dir / "last.pt").stat().st_mtime_ns == before


def test_invalid_options_are_usage_errors(tmp_path, capsys):
    assert train_mnist.main(tiny_args(tmp_path, "--epochs", "0")) == 2
    assert "--epochs: must be an int >= 1, got 0" in capsys.readouterr().err


def test_unsupported_device_is_a_clear_error(tmp_path, capsys):
    assert train_mnist.main(tiny_args(tmp_path, "--device", "tpu")) == 2
    assert "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err


def test_amp_run_routes_in_float32_while_the_convolutions_run_in_bfloat16(tmp_path, monkeypatch):
    # Parameters are float32 under autocast whatever happens inside; what --amp changes is
    # the dtype of the activations. Record them at DigitCaps' routing and at Conv1's output.
    seen = {"conv1": set(), "routing": set()}
    original_forward = CapsNet.forward

    def recording_forward(self, images, labels=None, *, mask="auto"):
        if self.training:  # the training steps (evaluation and plots run without --amp's cast)
            hooks = [
                self.conv1.register_forward_hook(lambda _m, _i, out: seen["conv1"].add(out.dtype)),
                self.digit_caps.register_forward_hook(
                    lambda _m, _i, out: seen["routing"].add(out.dtype)
                ),
            ]
        try:
            return original_forward(self, images, labels, mask=mask)
        finally:
            if self.training:
                for hook in hooks:
                    hook.remove()

    monkeypatch.setattr(CapsNet, "forward", recording_forward)
    result = train_mnist.run_training(
        tiny_args(tmp_path, "--epochs", "1", "--amp", "--limit-train", "32")
    )
    assert seen["conv1"] == {torch.bfloat16}, seen  # autocast is really on
    assert seen["routing"] == {torch.float32}, seen  # routing is not
    record = result.history[0]
    assert all(torch.isfinite(torch.tensor(record[f"test_{k}"])) for k in ("loss", "margin_loss"))


# --- fused vs reference ---------------------------------------------------------------------------


def test_fused_and_reference_follow_the_same_training_trajectory_in_float64():
    train_set = load_mnist(mnist_root(), train=True).head(24)
    models = {}
    for backend in ("fused", "reference"):
        torch.manual_seed(0)
        models[backend] = CapsNet(CapsNetConfig(capsule_bias=True), routing_backend=backend).double()
    optimizers = {
        name: torch.optim.Adam(model.parameters(), lr=1e-3) for name, model in models.items()
    }
    initial = {name: value.clone() for name, value in models["reference"].state_dict().items()}
    assert_same_state(models["fused"].state_dict(), initial)

    for step in range(3):
        images, labels = train_set.batch(torch.arange(step * 8, (step + 1) * 8))
        images = random_shift(images.double(), 2, step_generator(torch.device("cpu"), 0, 0, step))
        losses = {}
        for name, model in models.items():
            terms = capsnet_loss(model(images, labels), images, labels)
            optimizers[name].zero_grad()
            terms.total.backward()
            optimizers[name].step()
            losses[name] = terms
        for term in ("total", "margin", "reconstruction"):
            torch.testing.assert_close(
                getattr(losses["fused"], term), getattr(losses["reference"], term),
                rtol=1e-10, atol=1e-12,
            )  # fmt: skip
        fused_params = dict(models["fused"].named_parameters())
        for name, reference_param in models["reference"].named_parameters():
            torch.testing.assert_close(
                fused_params[name], reference_param, rtol=1e-7, atol=1e-10,
                msg=lambda m, step=step, name=name: f"step {step}, {name}: {m}",
            )  # fmt: skip
    # The trajectories compared above really moved: every parameter left its initial value.
    for name, value in models["reference"].state_dict().items():
        assert not torch.equal(initial[name], value), f"{name} did not change"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_training_follows_the_eager_trajectory(straight_run, tmp_path):
    # --compile runs the objective as one compiled graph; the arithmetic is reordered, so
    # the runs agree up to rounding, not bit for bit.
    eager, _ = straight_run
    compiled = train_mnist.run_training(tiny_args(tmp_path / "run", "--epochs", "2", "--compile"))
    for mine, theirs in zip(without_timing(compiled.history), without_timing(eager.history), strict=True):
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    eager_state = eager.model.state_dict()
    for name, value in compiled.model.state_dict().items():
        torch.testing.assert_close(value, eager_state[name], rtol=1e-3, atol=1e-4, msg=name)
