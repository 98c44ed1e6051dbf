"""The paper's figures from a trained checkpoint: ``python -m capsnet.figures KIND ...``.

    perturbation     Fig. 4: what the 16 dimensions of a digit capsule encode. For a few test
                     digits, the predicted class's capsule with one dimension at a time
                     changed by -0.25, -0.20, ..., +0.25 (11 columns), reconstructed by the
                     decoder; one row per dimension.
    reconstructions  test inputs above their reconstructions (Fig. 3); for a MultiMNIST
                     checkpoint, the figure below.
    multimnist       Fig. 5: MultiMNIST inputs above the reconstructions of their two digits
                     overlaid in red and green, with labels, predictions and reconstructed
                     classes.

Examples::

    python -m capsnet.figures perturbation --checkpoint runs/mnist/best.pt --out fig4.png
    python -m capsnet.figures multimnist --checkpoint runs/multimnist/best.pt --out fig5.png

The test examples are the first ``--count`` of the checkpoint's test set (``--data-dir``,
else the run's, else ``$CAPSNET_DATA_DIR``). Exit status 2 when the checkpoint, the data or
the network cannot make the figure (a message says why).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from capsnet.datasets import DataOptions, DatasetError, get_dataset, resolve_data_dir
from capsnet.training.checkpoint import Checkpoint, model_from_checkpoint, read_checkpoint
from capsnet.training.errors import SetupError
from capsnet.training.models import build_objective
from capsnet.training.plots import _new_figure, _save

# Fig. 4: "we tweak one dimension ... by intervals of 0.05 in the range [-0.25, 0.25]".
PERTURBATION_STEP = 0.05
PERTURBATION_STEPS = 5  # each side of zero: 11 columns


class FigureError(SetupError):
    """A figure cannot be made from this checkpoint (the message says why)."""


def perturbation_deltas() -> Tensor:
    """The 11 offsets of Fig. 4: -0.25 to +0.25 in steps of 0.05."""
    return torch.arange(-PERTURBATION_STEPS, PERTURBATION_STEPS + 1) * PERTURBATION_STEP


@torch.no_grad()
def perturbed_reconstructions(model, images: Tensor) -> tuple[Tensor, Tensor]:
    """Reconstructions of each image's predicted capsule with one dimension perturbed.

    Returns:
        ``[N, D, 11, C, H, W]`` images (D capsule dimensions, 11 offsets) and the predicted
        classes ``[N]``.
    """
    output = model(images, mask="predicted")
    classes = output.predictions
    deltas = perturbation_deltas().to(output.digit_caps)
    count, num_classes, dims = output.digit_caps.shape
    results = []
    for n in range(count):
        # [D, 11, num_classes, D]: dimension d of the predicted capsule moved by each delta.
        caps = output.digit_caps[n].expand(dims, len(deltas), num_classes, dims).clone()
        offsets = torch.eye(dims, dtype=deltas.dtype, device=deltas.device)
        caps[:, :, int(classes[n]), :] += deltas.view(1, -1, 1) * offsets.view(dims, 1, dims)
        flat = caps.reshape(-1, num_classes, dims)
        selected = classes[n].expand(flat.shape[0])
        made = model.decoder(flat, selected)
        results.append(made.view(dims, len(deltas), *made.shape[1:]))
    return torch.stack(results), classes


def save_perturbation_figure(
    path: str | os.PathLike, model, images: Tensor, labels: Tensor, title: str = ""
) -> None:
    """Fig. 4 for ``images`` (one panel per image, 16 rows x 11 columns each)."""
    made, classes = perturbed_reconstructions(model, images)
    made = made.float().cpu()
    count, dims, steps = made.shape[:3]
    figure = _new_figure(4.2 * count, 6.4)
    axes = figure.subplots(1, count, squeeze=False)[0]
    deltas = perturbation_deltas().tolist()
    for n, axis in enumerate(axes):
        tiles = made[n, :, :, 0]  # [D, 11, H, W]
        height, width = tiles.shape[-2:]
        # Tiles with a 1-pixel grey gap: [D * (H + 1), 11 * (W + 1)].
        gap = torch.full((dims, steps, height + 1, width + 1), 0.35)
        gap[:, :, :height, :width] = tiles
        mosaic = gap.permute(0, 2, 1, 3).reshape(dims * (height + 1), steps * (width + 1))
        axis.imshow(mosaic.clamp(0, 1).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        axis.set_xticks([(width + 1) * (k + 0.5) for k in range(steps)])
        axis.set_xticklabels([f"{d:+.2f}" for d in deltas], fontsize=6, rotation=90)
        axis.set_yticks([(height + 1) * (d + 0.5) for d in range(dims)])
        axis.set_yticklabels([str(d + 1) for d in range(dims)], fontsize=6)
        axis.set_ylabel("capsule dimension", fontsize=8)
        axis.set_xlabel("offset added to the dimension", fontsize=8)
        label = labels[n].tolist()
        axis.set_title(f"label {label}, predicted {int(classes[n])}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    _save(figure, path)


def _load(args: argparse.Namespace) -> tuple[Checkpoint, torch.nn.Module, object]:
    checkpoint = read_checkpoint(args.checkpoint)
    config = checkpoint.config
    model = model_from_checkpoint(checkpoint, routing_backend=args.routing)
    if getattr(model, "decoder", None) is None:
        raise FigureError(
            f"{args.checkpoint}: the network ({config.architecture}) has no reconstruction "
            "decoder; these figures need a CapsNet trained with --reconstruction"
        )
    spec = get_dataset(config.dataset)
    root = args.data_dir or config.data_dir
    options = DataOptions(
        root=resolve_data_dir(root),
        image_shape=config.model.input_shape,
        max_shift=config.effective_max_shift,
        test_copies=config.test_copies,
    )
    test_set = spec.load(options, "test", torch.device("cpu"))
    return checkpoint, model, test_set


def _first(test_set, count: int):
    if count < 1:
        raise FigureError(f"--count must be at least 1, got {count}")
    return test_set.batch(torch.arange(min(count, len(test_set))))


def make_figure(args: argparse.Namespace) -> Path:
    """Write the figure ``args.kind`` to ``args.out``; returns the path."""
    checkpoint, model, test_set = _load(args)
    config = checkpoint.config
    images, targets = _first(test_set, args.count)
    out = Path(args.out)
    where = f"{args.checkpoint} (epoch {checkpoint.epoch}, {config.dataset})"
    several = get_dataset(config.dataset).labels_per_example > 1
    if args.kind == "multimnist" and not several:
        raise FigureError(
            f"{args.checkpoint} was trained on {config.dataset}, not multimnist; use "
            "'reconstructions' for its figure"
        )
    if args.kind == "perturbation":
        labels = targets.labels if several else targets
        save_perturbation_figure(
            out, model, images, labels,
            title=f"{where}: each row changes one dimension of the predicted capsule",
        )  # fmt: skip
    else:
        objective = build_objective(config)
        objective.save_reconstructions(
            out, model, images, targets, args.mask,
            title=f"{where}: test inputs (top) and reconstructions from the {args.mask} "
            "classes' capsules (bottom)",
        )  # fmt: skip
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m capsnet.figures",
        description="Figures of the paper from a trained capsnet checkpoint.",
    )
    parser.add_argument(
        "kind", choices=("perturbation", "reconstructions", "multimnist"),
        help="perturbation (Fig. 4), reconstructions (Fig. 3), multimnist (Fig. 5)",
    )  # fmt: skip
    parser.add_argument("--checkpoint", required=True, help="a train_mnist.py checkpoint")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--count", type=int, default=None,
                        help="test examples shown (default: 3 for perturbation, else 8)")  # fmt: skip
    parser.add_argument("--data-dir", default=None, help="directory holding MNIST/raw")
    parser.add_argument(
        "--mask", choices=("predicted", "true"), default="predicted",
        help="reconstructions: from the predicted classes' capsules (default) or the true ones",
    )  # fmt: skip
    parser.add_argument(
        "--routing", choices=("fused", "reference"), default=None,
        help="routing implementation (default: the run's)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.count is None:
        args.count = 3 if args.kind == "perturbation" else 8
    try:
        out = make_figure(args)
    except (SetupError, DatasetError) as error:
        print(f"capsnet.figures: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
