"""What a training step minimises and what an evaluation counts, per kind of model.

The loop and the evaluation call an objective with the model and a batch and get back the
loss to minimise, the named loss terms to log, and the number of correct predictions. A
model or a data set with another loss or another notion of "correct" (several digits per
image, a plain CNN with cross-entropy) brings its own objective; the loop does not change.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from capsnet.losses import capsnet_loss


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
