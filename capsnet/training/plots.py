"""The PNGs written after every epoch: reconstructions (one digit, or a MultiMNIST pair as
in the paper's Fig. 5), and the training curves.

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


# Colours of the reconstructed digits in the MultiMNIST figure (first, second, ...).
DIGIT_COLOURS = ((1.0, 0.15, 0.15), (0.15, 1.0, 0.15), (0.3, 0.5, 1.0))


def overlay_colours(reconstructions: torch.Tensor) -> torch.Tensor:
    """``[N, K, 1, H, W]`` grey reconstructions -> ``[N, H, W, 3]``: reconstruction ``k`` in
    colour ``k`` (red, green, blue-ish), added on black and clipped (overlap turns yellow)."""
    count = reconstructions.shape[1]
    if count > len(DIGIT_COLOURS):
        raise ValueError(f"at most {len(DIGIT_COLOURS)} reconstructions per image, got {count}")
    colours = torch.tensor(DIGIT_COLOURS[:count], dtype=torch.float32)  # [K, 3]
    grey = reconstructions[:, :, 0].float()  # [N, K, H, W]
    return torch.einsum("nkhw,kc->nhwc", grey, colours).clamp_(0, 1)


def save_digit_pair_plot(
    path: str | os.PathLike,
    images: torch.Tensor,
    reconstructions: torch.Tensor,
    labels: torch.Tensor,
    predicted: torch.Tensor,
    reconstructed: torch.Tensor,
    title: str = "",
) -> None:
    """A figure like the paper's Fig. 5: each input (top) above its digits' reconstructions
    overlaid in colours (bottom: the first in red, the second in green); each column titled
    with the labels ``L``, the predicted classes ``P`` (the longest capsules; red when not
    both right) and the classes ``R`` whose capsules were reconstructed.

    Args:
        images: ``[N, 1, H, W]`` in [0, 1].
        reconstructions: ``[N, K, 1, H, W]`` in [0, 1].
        labels, predicted, reconstructed: ``[N, K]`` classes.
    """
    count = images.shape[0]
    if count == 0:
        raise ValueError("images is empty: nothing to plot")
    if reconstructions.dim() != 5 or reconstructions.shape[0] != count or (
        reconstructions.shape[2:] != images.shape[1:]
    ):
        raise ValueError(
            f"reconstructions must be [N, K, *image_shape] for images {tuple(images.shape)}, "
            f"got {tuple(reconstructions.shape)}"
        )
    images = images.detach().float().cpu()
    coloured = overlay_colours(reconstructions.detach().cpu())
    labels, predicted = labels.cpu().tolist(), predicted.cpu().tolist()
    reconstructed = reconstructed.cpu().tolist()
    figure = _new_figure(1.25 * count, 3.2)
    axes = figure.subplots(2, count, squeeze=False)
    for column in range(count):
        axes[0][column].imshow(images[column, 0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        axes[1][column].imshow(coloured[column].numpy())
        for axis in (axes[0][column], axes[1][column]):
            axis.set_xticks([])
            axis.set_yticks([])
        right = sorted(labels[column]) == sorted(predicted[column])
        axes[0][column].set_title(
            f"L:{','.join(map(str, labels[column]))}\nP:{','.join(map(str, predicted[column]))}",
            fontsize=8,
            color="black" if right else "red",
        )
        axes[1][column].set_xlabel(f"R:{','.join(map(str, reconstructed[column]))}", fontsize=8)
    axes[0][0].set_ylabel("input", fontsize=8)
    axes[1][0].set_ylabel("reconstructions", fontsize=8)
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
    loss_axis.set_ylabel(
        "loss per image (margin + weighted reconstruction)"
        if "margin_loss" in column
        else "loss per image"
    )
    loss_axis.set_yscale("log")
    draw(accuracy_axis, "accuracy", scale=100.0)
    accuracy_axis.set_ylabel("accuracy (%)")
    if "digit_accuracy" in column:  # several digits per image: the per-digit accuracy too
        draw(accuracy_axis, "digit_accuracy", scale=100.0, style="--", label="per digit")
    drawn_terms = 0
    for name, style in (("margin_loss", "-"), ("reconstruction_loss", "--")):
        if name in column:
            draw(terms_axis, name, style=style, label=name.replace("_", " "))
            drawn_terms += 1
    if drawn_terms:
        terms_axis.set_yscale("log")
        terms_axis.set_ylabel("loss terms per image")
    else:
        terms_axis.text(0.5, 0.5, "the loss has no separate terms", ha="center", va="center",
                        transform=terms_axis.transAxes, fontsize=9)  # fmt: skip
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
        if axis.get_legend_handles_labels()[0]:
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
