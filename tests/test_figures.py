"""``python -m capsnet.figures``: Fig. 4 (dimension perturbation), reconstructions, and
Fig. 5 (MultiMNIST), written from checkpoints; and the per-epoch MultiMNIST figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsnet.model import CapsNetConfig
from capsnet.training import figures
from capsnet.training.checkpoint import save_checkpoint
from capsnet.training.config import TrainConfig
from capsnet.training.state import TrainingState
from mnist_testing import mnist_root

# A small CapsNet: the figures' code paths at a fraction of the paper network's cost.
SMALL = dict(conv1_channels=8, primary_types=2, decoder_hidden=(32,))


def _checkpoint(tmp_path: Path, name: str, **settings) -> Path:
    """An untrained run's checkpoint (epoch 0): enough to draw every figure."""
    config = TrainConfig(data_dir=str(mnist_root()), routing="reference", **settings)
    state = TrainingState(config, torch.device("cpu"))
    return save_checkpoint(state.state_dict(), tmp_path / f"{name}.pt")


def _png(path: Path) -> tuple[int, int]:
    """The PNG's size in pixels; fails unless ``path`` is a non-empty PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100 and len(data) > 5000
    return width, height


@pytest.fixture(scope="module")
def mnist_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("mnist"), "mnist", model=CapsNetConfig(**SMALL))


@pytest.fixture(scope="module")
def multimnist_checkpoint(tmp_path_factory):
    config = CapsNetConfig(input_shape=(1, 36, 36), **SMALL)
    return _checkpoint(
        tmp_path_factory.mktemp("multimnist"), "multimnist", dataset="multimnist", model=config,
        limit_test=50,
    )  # fmt: skip


def test_perturbation_deltas_are_the_papers_11_steps():
    deltas = figures.perturbation_deltas()
    assert len(deltas) == 11
    torch.testing.assert_close(deltas, torch.linspace(-0.25, 0.25, 11))


def test_perturbed_reconstructions_change_one_dimension_at_a_time(mnist_checkpoint):
    from capsnet.training.checkpoint import model_from_checkpoint

    model = model_from_checkpoint(mnist_checkpoint)
    images = torch.rand(2, 1, 28, 28)
    made, classes = figures.perturbed_reconstructions(model, images)
    assert made.shape == (2, 16, 11, 1, 28, 28)
    out = model(images, mask="predicted")
    assert torch.equal(classes, out.predictions)
    # The middle column (offset 0) is the plain reconstruction, for every dimension.
    for d in range(16):
        torch.testing.assert_close(made[:, d, 5], out.reconstructions)
    # Offsets change the reconstruction, each dimension in its own way.
    assert float((made[:, :, 0] - made[:, :, 10]).abs().amax()) > 0
    assert not torch.allclose(made[0, 0, 0], made[0, 1, 0])


def test_perturbation_figure_is_written(mnist_checkpoint, tmp_path):
    out = tmp_path / "fig4.png"
    argv = ["perturbation", "--checkpoint", str(mnist_checkpoint), "--out", str(out), "--count", "2"]
    assert figures.main(argv) == 0
    width, height = _png(out)
    assert width > height  # two panels side by side


def test_reconstructions_figure_is_written(mnist_checkpoint, tmp_path):
    out = tmp_path / "reconstructions.png"
    argv = ["reconstructions", "--checkpoint", str(mnist_checkpoint), "--out", str(out)]
    assert figures.main(argv) == 0
    _png(out)


def test_multimnist_figure_is_written(multimnist_checkpoint, tmp_path, capsys):
    out = tmp_path / "fig5.png"
    argv = ["multimnist", "--checkpoint", str(multimnist_checkpoint), "--out", str(out),
            "--count", "5"]  # fmt: skip
    assert figures.main(argv) == 0
    _png(out)
    assert f"wrote {out}" in capsys.readouterr().out


def test_multimnist_figure_of_a_single_digit_checkpoint_is_refused(mnist_checkpoint, tmp_path, capsys):
    out = tmp_path / "nothing.png"
    argv = ["multimnist", "--checkpoint", str(mnist_checkpoint), "--out", str(out)]
    assert figures.main(argv) == 2
    assert "not multimnist" in capsys.readouterr().err
    assert not out.exists()


def test_a_network_without_decoder_is_refused(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path, "cnn", architecture="cnn-baseline")
    out = tmp_path / "nothing.png"
    assert figures.main(["perturbation", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "no reconstruction decoder" in capsys.readouterr().err
    assert not out.exists()


def test_a_missing_checkpoint_is_a_message(tmp_path, capsys):
    argv = ["perturbation", "--checkpoint", str(tmp_path / "absent.pt"), "--out", "x.png"]
    assert figures.main(argv) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_m_capsnet_figures_is_the_command(tmp_path):
    # The short name runs capsnet.training.figures (the core package does not import it).
    absent = tmp_path / "absent.pt"
    argv = ["perturbation", "--checkpoint", str(absent), "--out", str(tmp_path / "x.png")]
    result = subprocess.run(
        [sys.executable, "-m", "capsnet.figures", *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert "capsnet.figures: error:" in result.stderr and "does not exist" in result.stderr
