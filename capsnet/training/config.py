"""The training run's settings: one dataclass, saved in every checkpoint.

Fields split in two groups. *Trajectory* fields decide which weights a run produces (seed,
batch size, learning rate, ...); a resumed run must keep them, or it would not continue the
same run. *Run* fields (epochs, device, output directory, progress display, ...) may change
between a run and its resumption.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from capsnet.data import PAPER_MAX_SHIFT
from capsnet.losses import RECONSTRUCTION_WEIGHT
from capsnet.model import CapsNetConfig

EVAL_MASKS = ("predicted", "true")


@dataclass
class TrainConfig:
    """Settings of one MNIST training run; defaults follow the paper and its notebook.

    Attributes:
        model: the network (:class:`capsnet.model.CapsNetConfig`).
        epochs: total epochs of the run (a resumed run trains until it has this many).
        batch_size: training images per step *per process* (with ``torchrun`` the
            effective batch is ``world_size * batch_size``).
        eval_batch_size: test images per forward pass (memory only; no effect on results).
        lr: Adam's learning rate (1e-3, Adam's default, which the paper's code uses).
        lr_decay: learning-rate factor applied after every epoch (exponential decay).
        reconstruction_weight: scale of the reconstruction loss (Sec. 4.1: 0.0005).
        max_shift: random shift of training images in pixels (Sec. 5: up to 2).
        seed: seeds initialisation, batch order and shifts.
        limit_train, limit_test: use only the first N training / test images (quick runs).
        amp: automatic mixed precision (bfloat16 where supported, else float16 with loss
            scaling); routing itself always runs in float32.
        data_dir: MNIST root (holds ``MNIST/raw``); None: ``$CAPSNET_DATA_DIR`` or ``./data``.
        download: download MNIST if it is missing.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        out_dir: where checkpoints, the metrics log and plots go.
        eval_mask: decoder mask at test time: the ``"predicted"`` class (the paper) or the
            ``"true"`` one.
        progress: show tqdm progress bars.
        log_every: refresh the progress bar's running loss/accuracy every N steps (each
            refresh waits for the device).
        num_reconstructions: test images shown in each epoch's reconstruction plot.
    """

    model: CapsNetConfig = field(default_factory=CapsNetConfig)
    epochs: int = 50
    batch_size: int = 128
    eval_batch_size: int = 256
    lr: float = 1e-3
    lr_decay: float = 0.9
    reconstruction_weight: float = RECONSTRUCTION_WEIGHT
    max_shift: int = PAPER_MAX_SHIFT
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    amp: bool = False
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    out_dir: str = "runs/mnist"
    eval_mask: str = "predicted"
    progress: bool = True
    log_every: int = 10
    num_reconstructions: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = CapsNetConfig.from_dict(self.model)
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            _require_int(name, getattr(self, name), minimum=1)
        for name in ("max_shift", "seed", "num_reconstructions"):
            _require_int(name, getattr(self, name), minimum=0)
        for name in ("limit_train", "limit_test"):
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum=1)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if not self.reconstruction_weight >= 0:
            raise ValueError(
                f"reconstruction_weight must be >= 0, got {self.reconstruction_weight}"
            )
        if self.eval_mask not in EVAL_MASKS:
            raise ValueError(f"eval_mask must be one of {EVAL_MASKS}, got {self.eval_mask!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, safe for JSON and ``torch.load(weights_only=True)``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["model"] = self.model.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown TrainConfig fields {unknown}; known fields are {sorted(known)}"
            )
        return cls(**values)

    def trajectory_differences(self, other: TrainConfig) -> list[str]:
        """Names of the trajectory fields where ``other`` differs (``model.*`` for the network;
        the routing backend is an implementation choice and may change)."""
        different = [
            name for name in TRAJECTORY_FIELDS if getattr(self, name) != getattr(other, name)
        ]
        mine = dataclasses.replace(self.model, routing_backend="fused")
        theirs = dataclasses.replace(other.model, routing_backend="fused")
        for f in dataclasses.fields(mine):
            if getattr(mine, f.name) != getattr(theirs, f.name):
                different.append(f"model.{f.name}")
        return different


# Fields that decide the weights a run produces; a resumed run must keep them.
TRAJECTORY_FIELDS = (
    "batch_size",
    "lr",
    "lr_decay",
    "reconstruction_weight",
    "max_shift",
    "seed",
    "limit_train",
    "amp",
)


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
