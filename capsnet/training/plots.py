"""The two PNGs written after every epoch: reconstructions, and loss/accuracy curves.

Uses matplotlib's object-oriented API with the Agg canvas directly (no pyplot), so it
neither needs a display nor changes the backend of a notebook that imports capsnet.
"""

from __future__ import annotations

import math
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


def save_training_curves(path: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    """Loss terms (log scale) and accuracy per epoch, train and test."""
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("history is empty: nothing to plot")
    epochs = [record["epoch"] for record in history]
    figure = _new_figure(11, 4)
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    for split, style in (("train", "-"), ("test", "--")):
        for term, color in (
            ("loss", "black"),
            ("margin_loss", "tab:blue"),
            ("reconstruction_loss", "tab:orange"),
        ):
            values = [record[f"{split}_{term}"] for record in history]
            if all(v > 0 for v in values if not math.isnan(v)):
                loss_axis.plot(
                    epochs,
                    values,
                    style,
                    color=color,
                    marker=".",
                    label=f"{split} {term.replace('_', ' ')}",
                )
        accuracy_axis.plot(
            epochs,
            [100 * record[f"{split}_accuracy"] for record in history],
            style,
            marker=".",
            label=f"{split} accuracy",
        )
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("loss per image")
    loss_axis.legend(fontsize=7)
    loss_axis.grid(True, alpha=0.3)
    for axis in (loss_axis, accuracy_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracy_axis.set_xlabel("epoch")
    accuracy_axis.set_ylabel("accuracy (%)")
    accuracy_axis.legend(fontsize=7)
    accuracy_axis.grid(True, alpha=0.3)
    best = max(history, key=lambda record: record["test_accuracy"])
    accuracy_axis.set_title(
        f"best test accuracy {100 * best['test_accuracy']:.2f}% (epoch {best['epoch']})", fontsize=9
    )
    figure.tight_layout()
    _save(figure, path)
