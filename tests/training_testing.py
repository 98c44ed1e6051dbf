"""Helpers shared by the training tests: tiny real-MNIST runs and state comparisons."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from capsnet.training.config import TrainConfig
from mnist_testing import REPO, mnist_root

# The default backend; the reference backend's trajectory is checked against it.
ROUTING = "fused"
TINY_STEPS_PER_EPOCH = 6


def load_train_mnist():
    """Import train_mnist.py from the repository root (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("train_mnist", REPO / "train_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_args(out_dir: Path, *extra: str) -> list[str]:
    """A run of a few seconds per epoch: 96 training images in steps of 16, 32 test images."""
    return [
        "--data-dir", str(mnist_root()),
        "--routing", ROUTING,
        "--limit-train", "96",
        "--limit-test", "32",
        "--batch-size", "16",
        "--num-reconstructions", "2",
        "--no-progress",
        "--out-dir", str(out_dir),
        *extra,
    ]  # fmt: skip


def tiny_config(out_dir: Path, epochs: int, **changes) -> TrainConfig:
    return TrainConfig(
        routing=ROUTING,
        data_dir=str(mnist_root()),
        limit_train=96,
        limit_test=32,
        batch_size=16,
        num_reconstructions=2,
        progress=False,
        out_dir=str(out_dir),
        epochs=epochs,
        **changes,
    )


def assert_same_state(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), f"{key} differs"


def assert_same_optimizer_state(expected: dict, actual: dict) -> None:
    assert expected["param_groups"] == actual["param_groups"]
    assert expected["state"].keys() == actual["state"].keys()
    for index, state in expected["state"].items():
        for name, value in state.items():
            assert torch.equal(value, actual["state"][index][name]), (
                f"optimizer state {index}.{name} differs"
            )


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "epoch_seconds"} for record in history]
