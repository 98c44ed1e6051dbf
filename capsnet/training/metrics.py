"""Loss and accuracy bookkeeping without waiting for the device, and the CSV logs.

:class:`MetricSums` keeps an epoch's sample-weighted sums on the device (one float64
tensor: no precision lost over an epoch, one all-reduce over ranks). :class:`StepLog` keeps
every training step's batch loss terms and accuracy, on the device until the epoch ends
(or a checkpoint is written), then on the host: the per-step curves and TensorBoard
scalars come from it.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from capsnet.training.atomic_io import atomic_write
from capsnet.training.distributed import DistributedContext, all_reduce_sum_

def history_columns(term_names: Sequence[str]) -> tuple[str, ...]:
    """Columns of metrics.csv, one row per finished epoch, for an objective's loss terms."""
    return (
        "epoch",
        "global_step",
        "lr",
        *(f"train_{name}" for name in term_names),
        "train_accuracy",
        *(f"test_{name}" for name in term_names),
        "test_accuracy",
        "test_error_percent",
        "epoch_seconds",
    )


# metrics.csv's columns for CapsNet's loss terms (margin and reconstruction).
HISTORY_COLUMNS = history_columns(("loss", "margin_loss", "reconstruction_loss"))


class MetricSums:
    """Sample-weighted sums of named loss terms, of correct predictions and of examples.

    Args:
        term_names: the loss terms, e.g. ``("loss", "margin_loss", "reconstruction_loss")``.
        device: where the sums live (the training device).
    """

    def __init__(self, term_names: Sequence[str], device: torch.device) -> None:
        self.term_names = tuple(term_names)
        self.names = (*self.term_names, "correct", "count")
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)

    def update(self, terms: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        """Add one batch: ``terms`` are the batch means ``[len(term_names)]``, ``correct``
        the number of correct predictions (a 0-d tensor), ``count`` the batch size."""
        self.sums[: len(self.term_names)] += terms.detach().double() * count
        self.sums[-2] += correct.detach().double()
        self.sums[-1] += count

    def reduced(self, context: DistributedContext) -> MetricSums:
        """A copy summed over all ranks (a collective: call it on every rank)."""
        total = self.copy()
        all_reduce_sum_(total.sums, context)
        return total

    def copy(self) -> MetricSums:
        copied = MetricSums(self.term_names, self.sums.device)
        copied.sums.copy_(self.sums)
        return copied

    def averages(self) -> dict[str, float]:
        """Per-example means (waits for the device): the loss terms and accuracy in [0, 1]."""
        values = dict(zip(self.names, self.sums.tolist(), strict=True))
        count = values["count"]
        averages = {name: values[name] / count if count else math.nan for name in self.term_names}
        averages["accuracy"] = values["correct"] / count if count else math.nan
        return averages

    def state_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.sums.tolist(), strict=True))

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.sums.copy_(
            torch.tensor([float(state[name]) for name in self.names], dtype=torch.float64)
        )


class StepLog:
    """Every training step's batch metrics: ``global_step``, the loss terms, accuracy.

    ``record`` writes into a device buffer (no host sync); ``flush`` moves the rows recorded
    since the last flush to the host, which the run does once per epoch and before saving.
    """

    def __init__(self, term_names: Sequence[str], device: torch.device) -> None:
        self.columns = ("global_step", *term_names, "accuracy")
        self.device = device
        self.rows = torch.empty(0, len(self.columns), dtype=torch.float64)
        self._pending_steps: list[int] = []
        self._pending: list[torch.Tensor] = []  # device rows: terms, accuracy

    def record(
        self, global_step: int, terms: torch.Tensor, correct: torch.Tensor, count: int
    ) -> None:
        accuracy = (correct.detach().double() / count).reshape(1)
        self._pending.append(torch.cat([terms.detach().double(), accuracy]))
        self._pending_steps.append(global_step)

    def flush(self) -> torch.Tensor:
        """Move pending rows to the host (waits for the device); returns all rows."""
        if self._pending:
            values = torch.stack(self._pending).cpu()
            steps = torch.tensor(self._pending_steps, dtype=torch.float64).unsqueeze(1)
            self.rows = torch.cat([self.rows, torch.cat([steps, values], dim=1)])
            self._pending.clear()
            self._pending_steps.clear()
        return self.rows

    def last_rows(self, since_step: int) -> torch.Tensor:
        """Rows with ``global_step > since_step`` (after a flush)."""
        return self.rows[self.rows[:, 0] > since_step]

    def state_dict(self) -> torch.Tensor:
        return self.flush().clone()

    def load_state_dict(self, rows: torch.Tensor) -> None:
        if rows.dim() != 2 or rows.shape[1] != len(self.columns):
            raise ValueError(
                f"step_log must be [N, {len(self.columns)}] (columns {self.columns}), "
                f"got {tuple(rows.shape)}"
            )
        self._pending.clear()
        self._pending_steps.clear()
        self.rows = rows.to(torch.float64).cpu().clone()


def write_history_csv(
    path: str | os.PathLike, history: list[dict[str, Any]], columns: Sequence[str]
) -> None:
    """Write every epoch's record to ``path`` (atomically, whole file).

    Rewriting the whole log from the checkpointed history, instead of appending, keeps the
    log consistent with the checkpoint after a resume: an epoch that ran after the last
    checkpoint and was lost with the process does not appear twice.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({key: _format_value(record.get(key)) for key in columns})
    with atomic_write(path, "w") as file:
        file.write(buffer.getvalue())


def write_steps_csv(path: str | os.PathLike, step_log: StepLog, steps_per_epoch: int) -> None:
    """Every training step's batch metrics, with the fractional epoch (atomically)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("global_step", "epoch", *step_log.columns[1:]))
    for row in step_log.flush().tolist():
        step = int(row[0])
        writer.writerow((step, repr(step / steps_per_epoch), *map(repr, row[1:])))
    with atomic_write(path, "w") as file:
        file.write(buffer.getvalue())


def _format_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)  # shortest exact repr: the CSV round-trips the floats
    return value
