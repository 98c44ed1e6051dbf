"""What a training step minimises and what an evaluation counts, per kind of model.

The loop and the evaluation call an objective with the model and a batch and get back the
loss to minimise, the named loss terms to log, and the number of correct predictions. A
model or a data set with another loss or another notion of "correct" (several digits per
image, a plain CNN with cross-entropy) brings its own objective; the loop does not change.
"""

from __future__ import annotations

import itertools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsnet.losses import capsnet_loss, margin_loss


class StepLoss(NamedTuple):
    """One batch's result.

    Attributes:
        total: the scalar to minimise.
        terms: the batch means of the objective's ``term_names``, ``[len(term_names)]``
            (the first one is ``total``).
        correct: the number of correctly classified examples, a 0-d tensor.
        output: the model's output (for plots); None when the caller does not need it.
    """

    total: Tensor
    terms: Tensor
    correct: Tensor
    output: object = None


class CapsNetObjective:
    """Margin loss plus the scaled reconstruction loss (Sec. 3, 4.1); the prediction is the
    longest digit capsule.

    Args:
        reconstruction_weight: 0.0005 in the paper.
    """

    term_names = ("loss", "margin_loss", "reconstruction_loss")

    def __init__(self, reconstruction_weight: float) -> None:
        self.reconstruction_weight = reconstruction_weight

    def __call__(
        self, model: nn.Module, images: Tensor, labels: Tensor, mask: str = "auto"
    ) -> StepLoss:
        """``mask``: which capsule the decoder sees (``"auto"``: the label in training mode,
        the prediction in eval mode; see :meth:`capsnet.CapsNet.forward`)."""
        output = model(images, labels, mask=mask)
        terms = capsnet_loss(output, images, labels, self.reconstruction_weight)
        correct = (output.predictions == labels).sum()
        return StepLoss(
            terms.total, torch.stack([terms.total, terms.margin, terms.reconstruction]), correct,
            output,
        )  # fmt: skip

    @torch.no_grad()
    def save_reconstructions(
        self, path: str | os.PathLike, model: nn.Module, images: Tensor, labels: Tensor,
        mask: str, title: str = "",
    ) -> None:  # fmt: skip
        """Inputs above their reconstructions (the decoder masked as ``mask`` says)."""
        from capsnet.training.plots import save_reconstruction_plot

        output = model(images, labels, mask=mask)
        save_reconstruction_plot(
            path, images, output.reconstructions, labels, output.predictions, title=title
        )


def top_k_matches(lengths: Tensor, labels: Tensor) -> Tensor:
    """Which labels are among the K longest capsules, for K labels per example.

    Args:
        lengths: class scores ``[B, num_classes]``.
        labels: ``[B, K]``, K different classes per example.

    Returns:
        bool ``[B, K]``. An example is correct when all its K labels match (Sec. 6: "we
        consider the two most active digit capsules as the classification result");
        ``matches.float().mean()`` is the per-digit accuracy.
    """
    if labels.dim() != 2 or lengths.dim() != 2 or labels.shape[0] != lengths.shape[0]:
        raise ValueError(
            f"labels must be [B, K] and lengths [B, num_classes] with the same B, got "
            f"{tuple(labels.shape)} and {tuple(lengths.shape)}"
        )
    predicted = lengths.topk(labels.shape[1], dim=1).indices  # [B, K]
    return (labels.unsqueeze(2) == predicted.unsqueeze(1)).any(dim=2)


def _bare(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return getattr(model, "module", model)


class MultiDigitCapsNetObjective:
    """CapsNet on images holding K digits of different classes (MultiMNIST, Sec. 6, K = 2).

    The margin loss counts every present digit as present (Eq. 4 with ``T_k = 1`` for each
    of them). Each digit is reconstructed separately from its own capsule, masked by its
    true class in training, and compared with that digit's own image; the K reconstruction
    losses are summed and scaled by ``reconstruction_weight``, as in the official code
    (one reconstruction target per digit). An example is correct when its K longest
    capsules are its K classes; ``digit_accuracy`` is the fraction of digits among them.

    At evaluation with the predicted mask, the decoder sees the K longest capsules; their
    reconstructions are matched to the K digit images in the order that gives the smaller
    loss (the predicted classes have no order that says which digit they are).

    Targets: anything with ``labels [B, K]`` and ``digits [B, K, C, H, W]`` fields
    (:class:`capsnet.datasets.multimnist.PairTargets`).
    """

    term_names = ("loss", "margin_loss", "reconstruction_loss", "digit_accuracy")

    def __init__(self, reconstruction_weight: float) -> None:
        self.reconstruction_weight = reconstruction_weight

    def reconstruct(
        self, model: nn.Module, images: Tensor, labels: Tensor, mask: str = "auto"
    ) -> tuple[object, Tensor, Tensor | None, bool]:
        """The model's output, the K classes the decoder saw ``[B, K]``, their
        reconstructions ``[B, K, C, H, W]`` (None without a decoder), and whether those
        classes are the true ones."""
        use_true = mask == "true" or (mask == "auto" and model.training)
        count = labels.shape[1]
        if use_true:
            output = model(images, labels[:, 0], mask="true")
            selected = labels
        else:
            output = model(images, mask="predicted")
            first = output.lengths.argmax(dim=1, keepdim=True)
            others = output.lengths.scatter(1, first, float("-inf"))
            selected = torch.cat([first, others.topk(count - 1, dim=1).indices], dim=1)
        if output.reconstructions is None:
            return output, selected, None, use_true
        decoder = _bare(model).decoder
        rest = [decoder(output.digit_caps, selected[:, k]) for k in range(1, count)]
        reconstructions = torch.stack([output.reconstructions, *rest], dim=1)
        return output, selected, reconstructions, use_true

    def __call__(self, model: nn.Module, images: Tensor, targets, mask: str = "auto") -> StepLoss:
        labels = targets.labels
        output, _, reconstructions, use_true = self.reconstruct(model, images, labels, mask)
        margin = margin_loss(output.lengths, labels)
        if reconstructions is None or self.reconstruction_weight == 0:
            reconstruction = margin.new_zeros(())
        else:
            errors = _squared_errors(reconstructions, targets.digits)  # [B, K recon, K digit]
            count = labels.shape[1]
            orders = [range(count)] if use_true else itertools.permutations(range(count))
            per_order = torch.stack(
                [sum(errors[:, k, order[k]] for k in range(count)) for order in orders], dim=1
            )
            reconstruction = self.reconstruction_weight * per_order.min(dim=1).values.mean()
        total = margin + reconstruction
        matches = top_k_matches(output.lengths, labels)
        correct = matches.all(dim=1).sum()
        digit_accuracy = matches.to(margin.dtype).mean()
        terms = torch.stack([total, margin, reconstruction, digit_accuracy])
        return StepLoss(total, terms, correct, output)

    @torch.no_grad()
    def save_reconstructions(
        self, path: str | os.PathLike, model: nn.Module, images: Tensor, targets, mask: str,
        title: str = "",
    ) -> None:  # fmt: skip
        """Fig. 5: inputs above the K reconstructions overlaid in K colours."""
        from capsnet.training.plots import save_digit_pair_plot

        output, selected, reconstructions, _ = self.reconstruct(
            model, images, targets.labels, mask
        )
        predicted = output.lengths.topk(targets.labels.shape[1], dim=1).indices
        save_digit_pair_plot(
            path, images, reconstructions, targets.labels, predicted, selected, title=title
        )


def _squared_errors(reconstructions: Tensor, digits: Tensor) -> Tensor:
    """``[B, K, K]``: summed squared pixel error of reconstruction ``k`` against digit
    ``m``, in at least float32 (the decoder may return bfloat16 under autocast)."""
    dtype = torch.promote_types(torch.promote_types(reconstructions.dtype, digits.dtype),
                                torch.float32)  # fmt: skip
    made = reconstructions.to(dtype).flatten(2).unsqueeze(2)  # [B, K, 1, P]
    true = digits.to(dtype).flatten(2).unsqueeze(1)  # [B, 1, K, P]
    return ((made - true) ** 2).sum(dim=3)


class CrossEntropyObjective:
    """Softmax cross-entropy on a classifier's logits (the baseline CNN, Sec. 5); the
    prediction is the largest logit."""

    term_names = ("loss",)

    def __call__(self, model: nn.Module, images: Tensor, labels: Tensor, mask: str = "auto"):
        """``mask`` is accepted for the common interface; a classifier has no decoder."""
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        correct = (logits.argmax(dim=1) == labels).sum()
        return StepLoss(loss, loss.detach().reshape(1), correct, logits)
