"""The training program's options for the paper's other experiments: data-set defaults,
--eval-set, --stop-at-accuracy (early stopping, also across --resume), and a baseline-CNN
run through the same program (logs, checkpoints, evaluation)."""

from __future__ import annotations

import csv

import pytest
import torch

from capsnet.baselines import BaselineCNN
from capsnet.training.checkpoint import model_from_checkpoint, read_checkpoint
from capsnet.training.cli import build_parser, config_from_args
from capsnet.training.config import TrainConfig
from capsnet.training.errors import ConfigError
from capsnet.training.metrics import HISTORY_COLUMNS, history_columns
from capsnet.training.objective import MultiDigitCapsNetObjective
from capsnet.training.models import build_objective
from training_testing import load_train_mnist, tiny_args

train_mnist = load_train_mnist()


def _config(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize(
    "dataset, shape, shift",
    [("mnist", (1, 28, 28), 2), ("multimnist", (1, 36, 36), 4), ("expanded-mnist", (1, 40, 40), 6)],
)
def test_each_data_set_brings_its_canvas_and_shift(dataset, shape, shift):
    config = _config("--dataset", dataset)
    assert config.model.input_shape == shape
    assert config.max_shift is None and config.effective_max_shift == shift
    assert _config("--dataset", dataset, "--max-shift", "1").effective_max_shift == 1


def test_multimnist_trains_capsnet_with_the_two_digit_objective():
    objective = build_objective(_config("--dataset", "multimnist"))
    assert isinstance(objective, MultiDigitCapsNetObjective)
    assert history_columns(objective.term_names)[3:7] == (
        "train_loss", "train_margin_loss", "train_reconstruction_loss", "train_digit_accuracy",
    )  # fmt: skip


def test_a_shift_that_would_push_digits_off_the_canvas_is_refused():
    with pytest.raises(ConfigError, match="--max-shift: multimnist shifts whole digits"):
        _config("--dataset", "multimnist", "--max-shift", "5")
    assert _config("--dataset", "multimnist", "--max-shift", "6", "--image-size", "40")


@pytest.mark.parametrize("value", ["0", "100.5", "nan"])
def test_stop_at_accuracy_must_be_a_percentage(value):
    with pytest.raises(ConfigError, match="--stop-at-accuracy: must be a percentage"):
        _config("--stop-at-accuracy", value)


def test_eval_set_needs_eval(capsys):
    with pytest.raises(SystemExit) as info:
        train_mnist.parse_args(["--eval-set", "affine"])
    assert info.value.code == 2
    assert "--eval-set chooses what --eval evaluates" in capsys.readouterr().err


def test_capsnet_history_columns_are_unchanged():
    assert HISTORY_COLUMNS == history_columns(("loss", "margin_loss", "reconstruction_loss"))
    assert HISTORY_COLUMNS[3:6] == ("train_loss", "train_margin_loss", "train_reconstruction_loss")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny MNIST run asked for 3 epochs that stops after the first (any accuracy > 1%)."""
    out_dir = tmp_path_factory.mktemp("early")
    argv = tiny_args(out_dir, "--epochs", "3", "--stop-at-accuracy", "1")
    result = train_mnist.run_training(argv)
    return result, out_dir


def test_early_stopping_ends_the_run_after_the_epoch_reaching_the_target(stopped_run, capsys):
    result, out_dir = stopped_run
    assert len(result.history) == 1 and result.position.epoch == 1
    assert read_checkpoint(out_dir / "last.pt").epoch == 1
    # Resuming a run that reached its target does nothing...
    assert train_mnist.main(["--resume", str(out_dir / "last.pt"), "--no-progress"]) == 0
    assert "already reached the target test accuracy" in capsys.readouterr().out
    assert read_checkpoint(out_dir / "last.pt").epoch == 1
    # ...unless the target is raised: then it trains on.
    argv = ["--resume", str(out_dir / "last.pt"), "--stop-at-accuracy", "100", "--epochs", "2",
            "--no-progress"]  # fmt: skip
    assert train_mnist.main(argv) == 0
    assert read_checkpoint(out_dir / "last.pt").epoch == 2


def test_eval_set_of_a_data_set_without_it_is_refused(stopped_run, capsys):
    _, out_dir = stopped_run
    argv = ["--eval", str(out_dir / "best.pt"), "--eval-set", "affine", "--no-progress"]
    assert train_mnist.main(argv) == 2
    assert "--eval-set: must be one of test for mnist, got 'affine'" in capsys.readouterr().err
    argv = ["--eval", str(out_dir / "best.pt"), "--eval-set", "test", "--no-progress"]
    assert train_mnist.main(argv) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_the_baseline_cnn_trains_through_the_same_program(tmp_path, capsys):
    out_dir = tmp_path / "cnn"
    argv = tiny_args(out_dir, "--model", "cnn-baseline", "--epochs", "1", "--limit-train", "32")
    assert train_mnist.main(argv) == 0
    printed = capsys.readouterr().out
    assert "BaselineCNN on mnist: 35,445,522 parameters, device" in printed
    assert "routing" not in printed.splitlines()[0]
    with open(out_dir / "metrics.csv") as file:
        header = next(csv.reader(file))
    assert tuple(header) == history_columns(("loss",))
    assert (out_dir / "curves.png").stat().st_size > 0
    assert not (out_dir / "reconstructions").exists()  # no decoder, no reconstruction plot
    assert isinstance(model_from_checkpoint(out_dir / "last.pt"), BaselineCNN)
    argv = ["--eval", str(out_dir / "last.pt"), "--no-progress"]
    assert train_mnist.main(argv) == 0
    line = capsys.readouterr().out
    assert "test accuracy" in line and "loss" in line
    state = torch.load(out_dir / "last.pt", weights_only=True)
    assert state["train_config"]["architecture"] == "cnn-baseline"
