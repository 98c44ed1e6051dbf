"""The two PNGs written after every epoch: reconstructions, and the training curves.

Uses matplotlib's object-oriented API with the Agg canvas directly (no pyplot), so it
neither needs a display nor changes the backend of a notebook that imports capsnet.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from capsnet.training.atomic_io import atomic_write


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> None:
    with atomic_write(path, "wb") as file:
        figure.savefig(file, format="png")


def save_reconstruction_plot(
    path: str | os.PathLike,
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    title: str = "",
) -> None:
    """Inputs in the top row, their reconstructions below; each column titled with the
    label and the prediction (red when wrong).

    Args:
        images, reconstructions: ``[N, C, H, W]`` in [0, 1] (C = 1 or 3).
        labels, predictions: ``[N]``.
    """
    count = images.shape[0]
    if count == 0:
        raise ValueError("images is empty: nothing to plot")
    if reconstructions.shape != images.shape:
        raise ValueError(
            f"reconstructions must have the shape of images {tuple(images.shape)}, "
            f"got {tuple(reconstructions.shape)}"
        )
    images = images.detach().float().cpu()
    reconstructions = reconstructions.detach().float().cpu()
    labels, predictions = labels.cpu().tolist(), predictions.cpu().tolist()
    figure = _new_figure(1.2 * count, 2.9)
    axes = figure.subplots(2, count, squeeze=False)
    for column in range(count):
        for row, picture in enumerate((images[column], reconstructions[column])):
            axis = axes[row][column]
            shown = picture[0] if picture.shape[0] == 1 else picture.permute(1, 2, 0)
            axis.imshow(shown.clamp(0, 1).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            axis.set_xticks([])
            axis.set_yticks([])
        correct = labels[column] == predictions[column]
        axes[0][column].set_title(
            f"label {labels[column]}\npred {predictions[column]}",
            fontsize=8,
            color="black" if correct else "red",
        )
    axes[0][0].set_ylabel("input", fontsize=8)
    axes[1][0].set_ylabel("reconstruction", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    _save(figure, path)


TRAIN_COLOR = "tab:blue"
TEST_COLOR = "tab:orange"


def _moving_average(values: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    if window <= 1 or values.numel() == 0:
        return values
    cumulative = torch.cat([values.new_zeros(1), values.cumsum(0)])
    index = torch.arange(1, values.numel() + 1)
    start = (index - window).clamp(min=0)
    return (cumulative[index] - cumulative[start]) / (index - start)


def training_curves_figure(
    history: list[dict[str, Any]],
    step_rows: torch.Tensor,
    step_columns: tuple[str, ...],
    steps_per_epoch: int,
):
    """Loss, accuracy and loss terms against epochs: every training step (its batch, thin)
    and their running mean over a tenth of an epoch in blue; the test set after each epoch
    in orange, with markers, so that even one epoch gives a readable picture.

    Args:
        history: the per-epoch records (``train_*``, ``test_*`` keys).
        step_rows: ``[steps, len(step_columns)]``, column 0 the global step (may be empty:
            the per-epoch training averages are drawn instead).
        step_columns: names of the columns (``global_step``, loss terms, ``accuracy``).
        steps_per_epoch: to place steps on the epoch axis.
    """
    from matplotlib.ticker import MaxNLocator

    if not history and step_rows.numel() == 0:
        raise ValueError("nothing to plot: no finished epoch and no training step")
    figure = _new_figure(15, 4.2)
    loss_axis, accuracy_axis, terms_axis = figure.subplots(1, 3)
    window = max(1, steps_per_epoch // 10)
    test_epochs = [record["epoch"] for record in history]
    column = {name: index for index, name in enumerate(step_columns)}
    if step_rows.numel():
        x = (step_rows[:, 0] / steps_per_epoch).numpy()

        def train_series(name):
            return step_rows[:, column[name]]
    else:
        x = test_epochs

        def train_series(name):
            return torch.tensor([record[f"train_{name}"] for record in history])

    def draw(axis, name, scale=1.0, style="-", label=""):
        values = train_series(name) * scale
        if step_rows.numel():
            axis.plot(x, values.numpy(), style, color=TRAIN_COLOR, alpha=0.25, linewidth=0.6)
            values = _moving_average(values, window)
        axis.plot(x, values.numpy(), style, color=TRAIN_COLOR, linewidth=1.6,
                  label=f"train {label}".strip())  # fmt: skip
        tests = [record[f"test_{name}"] * scale for record in history]
        axis.plot(test_epochs, tests, style, color=TEST_COLOR, marker="o", markersize=6,
                  linewidth=1.6, label=f"test {label}".strip())  # fmt: skip

    draw(loss_axis, "loss")
    loss_axis.set_ylabel("loss per image (margin + weighted reconstruction)")
    loss_axis.set_yscale("log")
    draw(accuracy_axis, "accuracy", scale=100.0)
    accuracy_axis.set_ylabel("accuracy (%)")
    for name, style in (("margin_loss", "-"), ("reconstruction_loss", "--")):
        if name in column:
            draw(terms_axis, name, style=style, label=name.replace("_", " "))
    terms_axis.set_yscale("log")
    terms_axis.set_ylabel("loss terms per image")
    if history:
        best = max(history, key=lambda record: record["test_accuracy"])
        accuracy_axis.set_title(
            f"best test accuracy {100 * best['test_accuracy']:.2f}% (epoch {best['epoch']})",
            fontsize=9,
        )
    for axis in (loss_axis, accuracy_axis, terms_axis):
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    smoothing = f"every step (thin) and the mean over {window} steps" if window > 1 else "every step"
    figure.suptitle(f"training: {smoothing}; test: after each epoch", fontsize=9)
    figure.tight_layout()
    return figure


def save_training_curves(
    path: str | os.PathLike,
    history: list[dict[str, Any]],
    step_rows: torch.Tensor,
    step_columns: tuple[str, ...],
    steps_per_epoch: int,
) -> None:
    """Write :func:`training_curves_figure` to ``path`` (PNG, atomically)."""
    _save(training_curves_figure(history, step_rows, step_columns, steps_per_epoch), path)
