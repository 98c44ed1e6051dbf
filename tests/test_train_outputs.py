"""What a run shows and leaves besides checkpoints: the generated command line and the
docs table, logging, per-step training curves, TensorBoard event files; and checkpoints of
the first format."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from capsnet.training import cli
from capsnet.training.checkpoint import read_checkpoint, save_checkpoint
from capsnet.training.config import TrainConfig, config_settings
from capsnet.training.logs import configure_logging, tensorboard_available
from capsnet.training.plots import TEST_COLOR, TRAIN_COLOR, training_curves_figure
from mnist_testing import REPO
from training_testing import load_train_mnist, tiny_args

train_mnist = load_train_mnist()


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("one_epoch")
    result = train_mnist.run_training(tiny_args(out_dir, "--epochs", "1"))
    return result, out_dir


# --- one source of truth for the options ----------------------------------------------------------


def test_docs_options_table_is_the_generated_one():
    text = (REPO / "docs" / "TRAINING.md").read_text()
    match = re.search(r"<!-- options:begin -->\n(.*?)\n<!-- options:end -->", text, re.S)
    assert match, "docs/TRAINING.md lost its options markers"
    assert match.group(1) == cli.options_table(), (
        "docs/TRAINING.md's option table is stale: regenerate it with "
        "`python -m capsnet.training.cli`"
    )


def test_every_config_option_is_on_the_command_line_with_its_default_and_help():
    parser = cli.build_parser()
    flags = {option for action in parser._actions for option in action.option_strings}
    for path, setting in config_settings().items():
        assert setting.flag in flags, path
        help_text = next(a.help for a in parser._actions if setting.flag in a.option_strings)
        assert setting.help in help_text and "(default: " in help_text
    defaults = cli.config_from_args(parser.parse_args([]))
    assert defaults == TrainConfig()


def test_options_reach_the_config():
    args = cli.build_parser().parse_args(
        ["--decoder-input", "target", "--no-reconstruction", "--capsule-bias", "--image-size",
         "36", "--routing-iterations", "2", "--lr-decay", "0.95", "--amp", "--routing",
         "reference", "--no-tensorboard", "--compile"]  # fmt: skip
    )
    config = cli.config_from_args(args)
    assert config.model.decoder_input == "target" and config.model.reconstruction is False
    assert config.model.capsule_bias and config.model.input_shape == (1, 36, 36)
    assert config.model.routing_iterations == 2 and config.lr_decay == 0.95 and config.amp
    assert config.routing == "reference" and not config.tensorboard and config.compile
    assert config.batch_size == 128 and config.lr == 1e-3


def test_a_resumed_run_changes_only_the_options_given():
    saved = TrainConfig(lr=0.01, epochs=5, batch_size=64, routing="reference")
    args = cli.build_parser().parse_args(["--resume", "x.pt", "--epochs", "7", "--no-progress"])
    assert cli.given_settings(args) == {"epochs": 7, "progress": False}
    config = cli.config_from_args(args, base=saved)
    assert config.epochs == 7 and config.progress is False
    assert config.lr == 0.01 and config.batch_size == 64 and config.routing == "reference"


# --- logging --------------------------------------------------------------------------------------


def test_messages_go_through_logging_and_only_rank_0_prints_them(tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="capsnet.training"):
        train_mnist.run_training(tiny_args(tmp_path / "run", "--epochs", "1", "--limit-train", "32"))
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("CapsNet on mnist: 8,215,568 parameters") for m in messages)
    assert any(m.startswith("epoch 1/1  train loss") for m in messages)
    assert all(r.name == "capsnet.training" for r in caplog.records)

    logger = logging.getLogger("capsnet.training")
    configure_logging(rank=1)
    capsys.readouterr()
    logger.info("an epoch summary")
    logger.warning("a problem")
    assert capsys.readouterr().out == "warning: a problem\n"
    configure_logging(rank=0)
    logger.info("an epoch summary")
    assert capsys.readouterr().out == "an epoch summary\n"


# --- curves ---------------------------------------------------------------------------------------


def test_curves_after_one_epoch_show_every_step_and_the_test_point_in_distinct_colours(one_epoch):
    result, out_dir = one_epoch
    state = read_checkpoint(out_dir / "last.pt").state
    figure = training_curves_figure(
        state["history"], state["step_log"], ("global_step", "loss", "margin_loss",
        "reconstruction_loss", "accuracy"), steps_per_epoch=6,
    )  # fmt: skip
    loss_axis = figure.axes[0]
    train = [line for line in loss_axis.lines if line.get_label() == "train"]
    test = [line for line in loss_axis.lines if line.get_label() == "test"]
    assert len(train) == 1 and len(test) == 1
    assert len(train[0].get_xdata()) == 6  # one point per training step of the epoch
    assert list(train[0].get_xdata()) == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1])
    assert list(test[0].get_xdata()) == [1] and test[0].get_marker() == "o"  # visible alone
    assert train[0].get_color() == TRAIN_COLOR and test[0].get_color() == TEST_COLOR
    assert TRAIN_COLOR != TEST_COLOR
    assert (out_dir / "curves.png").stat().st_size > 10_000
    steps = (out_dir / "steps.csv").read_text().splitlines()
    assert steps[0] == "global_step,epoch,loss,margin_loss,reconstruction_loss,accuracy"
    assert len(steps) == 7


# --- TensorBoard ----------------------------------------------------------------------------------

needs_tensorboard = pytest.mark.skipif(
    not tensorboard_available(),
    reason="needs_tensorboard: the tensorboard package is not installed (pip install tensorboard)",
)


@needs_tensorboard
def test_tensorboard_event_files_hold_every_step_and_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "run"
    train_mnist.run_training(tiny_args(out_dir, "--epochs", "1"))
    train_mnist.run_training(["--resume", str(out_dir / "last.pt"), "--epochs", "2", "--no-progress"])
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train_step/loss", "train_step/accuracy", "test/accuracy", "test/loss",
                "train/loss", "epoch/lr"):  # fmt: skip
        assert tag in tags, (tag, tags)
    steps = [event.step for event in events.Scalars("train_step/loss")]
    assert steps == list(range(1, 13))  # both epochs, no step twice after the resume
    assert [event.step for event in events.Scalars("test/accuracy")] == [6, 12]
    history = read_checkpoint(out_dir / "last.pt").state["history"]
    assert [e.value for e in events.Scalars("test/accuracy")] == pytest.approx(
        [record["test_accuracy"] for record in history]
    )


def test_without_tensorboard_the_run_says_so_and_goes_on(tmp_path, monkeypatch, caplog):
    import capsnet.training.logs as logs

    monkeypatch.setattr(logs, "tensorboard_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="capsnet.training"):
        train_mnist.run_training(tiny_args(tmp_path / "run", "--epochs", "1", "--limit-train", "32"))
    assert any("tensorboard is not installed" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "run" / "tensorboard").exists()


# --- checkpoints of format 1 ----------------------------------------------------------------------


def as_format_1(state: dict) -> dict:
    """A checkpoint as capsnet's first training program wrote it (keys and layout of
    format 1: the routing backend inside the network's config; no best_epoch, no step_log)."""
    old = {key: value for key, value in state.items() if key not in ("best_epoch", "step_log")}
    old["format_version"] = 1
    config = dict(state["train_config"])
    model = dict(config["model"])
    model["routing_backend"] = config.pop("routing")
    for key in ("dataset", "architecture", "compile", "tensorboard"):
        config.pop(key)
    config["model"] = model
    old["train_config"] = config
    return old


def test_a_format_1_checkpoint_resumes_and_evaluates(tmp_path, one_epoch, capsys):
    result, source = one_epoch
    out_dir = tmp_path / "old_run"
    out_dir.mkdir()
    state = torch.load(source / "last.pt", weights_only=True)
    save_checkpoint(as_format_1(state), out_dir / "last.pt")
    save_checkpoint(as_format_1(torch.load(source / "best.pt", weights_only=True)), out_dir / "best.pt")
    old = read_checkpoint(out_dir / "last.pt")
    assert old.state["format_version"] == 2 and old.config.routing == "fused"
    assert old.best_epoch == 1 and old.state["step_log"].shape == (0, 5)
    assert train_mnist.main(["--eval", str(out_dir / "last.pt"), "--limit-test", "32",
                             "--no-progress"]) == 0  # fmt: skip
    expected = f"test accuracy {100 * result.history[0]['test_accuracy']:.2f}%"
    assert expected in capsys.readouterr().out
    resumed = train_mnist.run_training(
        ["--resume", str(out_dir / "last.pt"), "--epochs", "2", "--no-progress"]
    )
    assert len(resumed.history) == 2
    assert read_checkpoint(out_dir / "last.pt").state["format_version"] == 2
