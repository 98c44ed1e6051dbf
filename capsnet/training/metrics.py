"""Loss and accuracy bookkeeping: running sums on the device, and the per-epoch CSV log.

Sums stay on the training device between progress-bar refreshes, so the hot loop does not
wait for the device after every step.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Any

import torch

from capsnet.losses import CapsNetLossTerms
from capsnet.training.atomic_io import atomic_write
from capsnet.training.distributed import DistributedContext, all_reduce_sum_

# Order of the sums in MetricSums' tensor.
_SUM_NAMES = ("loss", "margin_loss", "reconstruction_loss", "correct", "count")

# Columns of metrics.csv: one row per finished epoch.
HISTORY_COLUMNS = (
    "epoch",
    "global_step",
    "lr",
    "train_loss",
    "train_margin_loss",
    "train_reconstruction_loss",
    "train_accuracy",
    "test_loss",
    "test_margin_loss",
    "test_reconstruction_loss",
    "test_accuracy",
    "test_error_percent",
    "epoch_seconds",
)


class MetricSums:
    """Sample-weighted sums of the loss terms and of correct predictions.

    Kept as one float64 tensor on the device: float64 so that sums over an epoch lose no
    precision, one tensor so that reducing over ranks is a single all-reduce.
    """

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(_SUM_NAMES), dtype=torch.float64, device=device)

    def update(
        self, terms: CapsNetLossTerms, predictions: torch.Tensor, labels: torch.Tensor
    ) -> None:
        count = labels.shape[0]
        batch = torch.stack(
            [
                terms.total.detach().double() * count,
                terms.margin.detach().double() * count,
                terms.reconstruction.detach().double() * count,
                (predictions == labels).sum().double(),
            ]
        )
        self.sums[:4] += batch
        self.sums[4] += count

    def reduced(self, context: DistributedContext) -> MetricSums:
        """A copy summed over all ranks."""
        total = MetricSums(self.sums.device)
        total.sums.copy_(self.sums)
        all_reduce_sum_(total.sums, context)
        return total

    def averages(self) -> dict[str, float]:
        """Per-sample means (waits for the device): loss terms and accuracy in [0, 1]."""
        values = dict(zip(_SUM_NAMES, self.sums.tolist(), strict=True))
        count = values["count"]
        if count == 0:
            return {
                "loss": math.nan,
                "margin_loss": math.nan,
                "reconstruction_loss": math.nan,
                "accuracy": math.nan,
            }
        return {
            "loss": values["loss"] / count,
            "margin_loss": values["margin_loss"] / count,
            "reconstruction_loss": values["reconstruction_loss"] / count,
            "accuracy": values["correct"] / count,
        }

    def state_dict(self) -> dict[str, float]:
        return dict(zip(_SUM_NAMES, self.sums.tolist(), strict=True))

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.sums.copy_(
            torch.tensor([float(state[name]) for name in _SUM_NAMES], dtype=torch.float64)
        )


def write_history_csv(path: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    """Write every epoch's record to ``path`` (atomically, whole file).

    Rewriting the whole log from the checkpointed history, instead of appending, keeps the
    log consistent with the checkpoint after a resume: an epoch that ran after the last
    checkpoint and was lost with the process does not appear twice.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for record in history:
        writer.writerow({key: _format_value(record.get(key)) for key in HISTORY_COLUMNS})
    with atomic_write(path, "w") as file:
        file.write(buffer.getvalue())


def _format_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)  # shortest exact repr: the CSV round-trips the floats
    return value
