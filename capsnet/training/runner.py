"""A whole MNIST training run: set-up, resume, epochs, evaluation, checkpoints, log and plots.

``train_mnist.py`` is a command-line front end to :func:`fit` and :func:`evaluate_checkpoint`;
both can be called from Python as well.

Files in ``out_dir`` (only rank 0 writes, every write is atomic):

    config.json                  the run's TrainConfig
    last.pt                      latest state: after every epoch, and on Ctrl-C mid-epoch
    best.pt                      the epoch with the highest test accuracy so far
    metrics.csv                  one row per finished epoch (columns: metrics.HISTORY_COLUMNS)
    curves.png                   loss terms and accuracy per epoch
    reconstructions/epoch_NNN.png  test inputs above their reconstructions
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from capsnet import _extension
from capsnet.data import ImageSet, load_mnist, resolve_data_dir
from capsnet.model import CapsNet, CapsNetConfig
from capsnet.training.atomic_io import atomic_write
from capsnet.training.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from capsnet.training.config import TrainConfig
from capsnet.training.distributed import (
    DistributedContext,
    any_rank,
    cleanup_distributed,
    setup_distributed,
)
from capsnet.training.interrupt import GracefulInterrupt, StopRequest
from capsnet.training.loop import RunPosition, evaluate, steps_per_epoch, train_epoch
from capsnet.training.metrics import MetricSums, write_history_csv
from capsnet.training.plots import save_reconstruction_plot, save_training_curves
from capsnet.training.precision import make_grad_scaler
from capsnet.training.rng_state import capture_rng_state, restore_rng_state

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_LOG = "metrics.csv"
CURVES_PLOT = "curves.png"
RECONSTRUCTIONS_DIR = "reconstructions"
CONFIG_FILE = "config.json"


class RoutingBackendUnavailableError(RuntimeError):
    """``routing_backend="fused"`` was asked for where no compiled kernel exists."""


class ResumeError(ValueError):
    """A checkpoint cannot continue the requested run (the message says why)."""


class OutputDirInUseError(FileExistsError):
    """``out_dir`` holds another run's checkpoints, which a new run would overwrite."""


class TrainingInterrupted(Exception):
    """The run stopped early on request (Ctrl-C, SIGTERM) after saving ``checkpoint_path``."""

    def __init__(self, checkpoint_path: Path | None, position: RunPosition) -> None:
        where = (
            f"saved {checkpoint_path}" if checkpoint_path else "no checkpoint written on this rank"
        )
        super().__init__(
            f"training stopped at epoch {position.epoch + 1}, step {position.batch_in_epoch} "
            f"(global step {position.global_step}); {where}"
        )
        self.checkpoint_path = checkpoint_path
        self.position = position


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained bare CapsNet (never the DDP wrapper).
        history: one metrics record per finished epoch (the rows of metrics.csv).
        out_dir: where the files went.
        position: where the run ended.
    """

    model: CapsNet
    history: list[dict[str, Any]]
    out_dir: Path
    position: RunPosition


def check_routing_backend(model_config: CapsNetConfig, device: torch.device) -> None:
    """Fail before any work if the fused kernel the model asks for does not exist."""
    if model_config.routing_backend == "fused" and not _extension.has_kernel(
        device.type, torch.float32
    ):
        reason = _extension.missing_reason(device.type, torch.float32)
        raise RoutingBackendUnavailableError(
            f"--routing fused needs the compiled routing kernel for {device.type}: {reason}. "
            "Build it, or train with --routing reference (same results, much slower)."
        )


def load_datasets(
    config: TrainConfig, context: DistributedContext, train: bool = True
) -> tuple[ImageSet | None, ImageSet]:
    """The training set (or None when ``train`` is False) and the test set, on the device,
    limited and padded as ``config`` says."""
    root = resolve_data_dir(config.data_dir)

    def load(split_is_train: bool) -> ImageSet:
        # With several processes only rank 0 downloads; the others wait and then read.
        if config.download and context.is_distributed and not context.is_main:
            dist.barrier()
        images = load_mnist(
            root, train=split_is_train, device=context.device, download=config.download
        )
        if config.download and context.is_distributed and context.is_main:
            dist.barrier()
        return images

    _, height, width = config.model.input_shape
    if config.model.input_shape[0] != 1:
        raise ValueError(
            f"MNIST has 1 channel, but model.input_shape is {config.model.input_shape}"
        )
    test_set = load(False).head(config.limit_test).padded_to(height, width)
    train_set = load(True).head(config.limit_train).padded_to(height, width) if train else None
    return train_set, test_set


class Trainer:
    """One training run; :func:`fit` is the function to call."""

    def __init__(self, config: TrainConfig, context: DistributedContext) -> None:
        self.config = config
        self.context = context
        self.device = context.device
        self.out_dir = Path(config.out_dir)
        check_routing_backend(config.model, self.device)
        self.train_set, self.test_set = load_datasets(config, context)
        if len(self.train_set) < context.world_size:
            raise ValueError(
                f"{len(self.train_set)} training images cannot be shared by "
                f"{context.world_size} processes"
            )

        torch.manual_seed(config.seed)  # the initial weights (the same on every rank)
        self.model = CapsNet(config.model).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        # Per-epoch exponential decay (stepped after each epoch).
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(
            self.optimizer, gamma=config.lr_decay
        )
        self.scaler = make_grad_scaler(self.device, config.amp)
        self.position = RunPosition()
        self.sums = MetricSums(self.device)
        self.history: list[dict[str, Any]] = []
        self.best_test_accuracy = -1.0
        self.epoch_seconds_before_resume = 0.0

    # -- resume -------------------------------------------------------------------------
    def restore(self, path: str | Path) -> None:
        """Continue from checkpoint ``path``: weights, optimiser, schedule, position, history."""
        checkpoint = load_checkpoint(path)
        saved = TrainConfig.from_dict(checkpoint["train_config"])
        different = saved.trajectory_differences(self.config)
        if different:
            details = "; ".join(
                f"{name}: checkpoint {_lookup(saved, name)!r}, "
                f"requested {_lookup(self.config, name)!r}"
                for name in different
            )
            raise ResumeError(
                f"cannot resume {path} with different training settings ({details}). A resumed run "
                "keeps the settings it started with; start a new run (another --out-dir) to "
                "change them."
            )
        saved_world_size = checkpoint.get("world_size", 1)
        if checkpoint["batch_in_epoch"] > 0 and saved_world_size != self.context.world_size:
            raise ResumeError(
                f"{path} was saved mid-epoch by {saved_world_size} process(es); resume it with "
                "the same "
                f"number of processes (this run has {self.context.world_size}), or resume from an "
                "end-of-epoch checkpoint"
            )
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("grad_scaler"):
            self.scaler.load_state_dict(checkpoint["grad_scaler"])
        self.position = RunPosition(
            epoch=checkpoint["epoch"],
            batch_in_epoch=checkpoint["batch_in_epoch"],
            global_step=checkpoint["global_step"],
        )
        self.history = list(checkpoint["history"])
        self.best_test_accuracy = checkpoint.get("best_test_accuracy", -1.0)
        # The partial epoch's sums were reduced over ranks when saved: one rank holds them.
        if checkpoint.get("epoch_sums") and self.context.is_main:
            self.sums.load_state_dict(checkpoint["epoch_sums"])
        self.epoch_seconds_before_resume = checkpoint.get("epoch_seconds_so_far", 0.0)
        if "rng" in checkpoint:
            restore_rng_state(checkpoint["rng"])
        self._log(
            f"resumed from {path}: epoch {self.position.epoch + 1}, "
            f"step {self.position.batch_in_epoch} "
            f"of that epoch, global step {self.position.global_step}"
        )

    # -- checkpoints and outputs ----------------------------------------------------------
    def make_checkpoint(self, epoch_seconds_so_far: float = 0.0) -> dict[str, Any]:
        """The run's state as tensors and plain values (loadable with weights_only=True).
        Call on every rank (it reduces the epoch's running sums), save on rank 0."""
        return {
            "format_version": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "train_config": self.config.to_dict(),
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.batch_in_epoch,
            "global_step": self.position.global_step,
            "epoch_sums": self.sums.reduced(self.context).state_dict()
            if self.position.batch_in_epoch
            else None,
            "epoch_seconds_so_far": epoch_seconds_so_far,
            "history": list(self.history),
            "best_test_accuracy": self.best_test_accuracy,
            "world_size": self.context.world_size,
            "rng": capture_rng_state(),
        }

    def _write_config(self) -> None:
        with atomic_write(self.out_dir / CONFIG_FILE, "w") as file:
            json.dump(self.config.to_dict(), file, indent=2)
            file.write("\n")

    def _write_epoch_outputs(self, record: dict[str, Any], improved: bool) -> None:
        checkpoint = self.make_checkpoint()
        if not self.context.is_main:
            return
        save_checkpoint(checkpoint, self.out_dir / LAST_CHECKPOINT)
        if improved:
            save_checkpoint(checkpoint, self.out_dir / BEST_CHECKPOINT)
        write_history_csv(self.out_dir / METRICS_LOG, self.history)
        save_training_curves(self.out_dir / CURVES_PLOT, self.history)
        if self.model.decoder is not None and self.config.num_reconstructions > 0:
            self._plot_reconstructions(record["epoch"])

    @torch.no_grad()
    def _plot_reconstructions(self, epoch: int) -> None:
        count = min(self.config.num_reconstructions, len(self.test_set))
        images, labels = self.test_set.batch(torch.arange(count))
        self.model.eval()
        output = self.model(images, labels, mask=self.config.eval_mask)
        save_reconstruction_plot(
            self.out_dir / RECONSTRUCTIONS_DIR / f"epoch_{epoch:03d}.png",
            images,
            output.reconstructions,
            labels,
            output.predictions,
            title=f"epoch {epoch}: test images (top) and reconstructions from the "
            f"{self.config.eval_mask} class's capsule (bottom)",
        )

    def _log(self, message: str) -> None:
        if self.context.is_main:
            print(message, flush=True)

    # -- the run ---------------------------------------------------------------------------
    def run(self, stop: StopRequest, on_step: Callable[[RunPosition], None] | None = None) -> None:
        config, context = self.config, self.context
        if context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
        train_model = self.model
        if context.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        # From here on a Ctrl-C saves a checkpoint (the header below tells the user so).
        with GracefulInterrupt(stop, announce=context.is_main):
            self._log_start()
            if self.position.epoch >= config.epochs:
                self._log(
                    f"already trained {self.position.epoch} epochs (--epochs {config.epochs}): "
                    "nothing to do"
                )
            while self.position.epoch < config.epochs:
                started = time.perf_counter()
                finished = train_epoch(
                    model=train_model,
                    optimizer=self.optimizer,
                    scaler=self.scaler,
                    train_set=self.train_set,
                    config=config,
                    context=context,
                    position=self.position,
                    sums=self.sums,
                    stop=stop,
                    on_step=on_step,
                )
                elapsed = self.epoch_seconds_before_resume + time.perf_counter() - started
                if not finished:
                    self._stop_mid_epoch(elapsed)
                self._finish_epoch(elapsed)
                # A stop asked for during evaluation: the end-of-epoch checkpoint is saved.
                if self.position.epoch < config.epochs and any_rank(stop.requested, context):
                    raise TrainingInterrupted(self._last_path(), self.position)

    def _log_start(self) -> None:
        config, context = self.config, self.context
        num_params = sum(p.numel() for p in self.model.parameters())
        processes = f" x {context.world_size} processes" if context.is_distributed else ""
        per_process = " per process" if context.is_distributed else ""
        steps = steps_per_epoch(len(self.train_set), config, context)
        self._log(
            f"CapsNet: {num_params:,} parameters, routing {config.model.routing_backend}, "
            f"device {self.device}{processes}; {len(self.train_set)} training images "
            f"({steps} steps/epoch of {config.batch_size}{per_process}), "
            f"{len(self.test_set)} test images; writing to {self.out_dir} "
            "(Ctrl-C saves a checkpoint)"
        )

    def _finish_epoch(self, train_seconds: float) -> None:
        config = self.config
        train_metrics = self.sums.reduced(self.context).averages()
        eval_started = time.perf_counter()
        test_metrics = evaluate(self.model, self.test_set, config, self.context)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        epoch = self.position.epoch + 1
        record = {
            "epoch": epoch,
            "global_step": self.position.global_step,
            "lr": lr,
            **{f"train_{key}": value for key, value in train_metrics.items()},
            **{f"test_{key}": value for key, value in test_metrics.items()},
            "test_error_percent": 100.0 * (1.0 - test_metrics["accuracy"]),
            "epoch_seconds": train_seconds + time.perf_counter() - eval_started,
        }
        self.history.append(record)
        self.position = RunPosition(
            epoch=epoch, batch_in_epoch=0, global_step=self.position.global_step
        )
        self.sums = MetricSums(self.device)
        self.epoch_seconds_before_resume = 0.0
        improved = test_metrics["accuracy"] > self.best_test_accuracy
        if improved:
            self.best_test_accuracy = test_metrics["accuracy"]
        self._write_epoch_outputs(record, improved)
        self._log(_epoch_summary(record, config.epochs, improved))

    def _stop_mid_epoch(self, epoch_seconds_so_far: float) -> None:
        checkpoint = self.make_checkpoint(epoch_seconds_so_far)
        path = None
        if self.context.is_main:
            path = save_checkpoint(checkpoint, self.out_dir / LAST_CHECKPOINT)
        raise TrainingInterrupted(path, self.position)

    def _last_path(self) -> Path | None:
        return self.out_dir / LAST_CHECKPOINT if self.context.is_main else None


def _lookup(config: TrainConfig, name: str) -> Any:
    if name.startswith("model."):
        return getattr(config.model, name.removeprefix("model."))
    return getattr(config, name)


def _epoch_summary(record: dict[str, Any], epochs: int, improved: bool) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}  "
        f"train loss {record['train_loss']:.4f} (margin {record['train_margin_loss']:.4f}, "
        f"recon {record['train_reconstruction_loss']:.4f}) "
        f"acc {100 * record['train_accuracy']:.2f}%  |  "
        f"test loss {record['test_loss']:.4f} (margin {record['test_margin_loss']:.4f}, "
        f"recon {record['test_reconstruction_loss']:.4f}) acc {100 * record['test_accuracy']:.2f}%"
        f"{' (best)' if improved else ''}  |  "
        f"lr {record['lr']:.2e}  {record['epoch_seconds']:.1f} s"
    )


def fit(
    config: TrainConfig,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    stop: StopRequest | None = None,
    on_step: Callable[[RunPosition], None] | None = None,
) -> FitResult:
    """Train CapsNet on MNIST as ``config`` says; under ``torchrun``, with DDP.

    Args:
        config: the run's settings.
        resume: a checkpoint to continue from (``last.pt`` of an earlier run). Its training
            settings must equal ``config``'s (see :meth:`TrainConfig.trajectory_differences`);
            given the same seed the result equals an uninterrupted run's, bit for bit on CPU.
        overwrite: allow replacing another run's files in ``config.out_dir``.
        stop: set it (or press Ctrl-C) to stop after the current step with a checkpoint.
        on_step: called with the run position after every training step.

    Raises:
        TrainingInterrupted: stopped early; the exception names the checkpoint written.
        OutputDirInUseError, RoutingBackendUnavailableError, DatasetNotFoundError,
        ResumeError: before training.
    """
    context = setup_distributed(config.device)
    try:
        _check_out_dir(Path(config.out_dir), resume, overwrite, context)
        trainer = Trainer(config, context)
        if resume is not None:
            trainer.restore(resume)
        trainer.run(stop if stop is not None else StopRequest(), on_step)
        return FitResult(trainer.model, trainer.history, trainer.out_dir, trainer.position)
    finally:
        cleanup_distributed()


def _check_out_dir(
    out_dir: Path, resume: str | Path | None, overwrite: bool, context: DistributedContext
) -> None:
    """Refuse to overwrite another run: its checkpoints would be lost. Continuing a run from
    a checkpoint in ``out_dir`` itself is fine. Rank 0 decides (other nodes may not see its
    file system) and every rank follows."""
    in_use = False
    if context.is_main and not overwrite and (out_dir / LAST_CHECKPOINT).exists():
        continues_it = resume is not None and Path(resume).resolve().parent == out_dir.resolve()
        in_use = not continues_it
    if any_rank(in_use, context):
        raise OutputDirInUseError(
            f"{out_dir} already holds a run ({out_dir / LAST_CHECKPOINT}). Continue it with "
            f"--resume {out_dir / LAST_CHECKPOINT}, choose another --out-dir, or pass "
            "--overwrite to replace it."
        )


def evaluate_checkpoint(
    path: str | Path,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    routing_backend: str | None = None,
    eval_mask: str = "predicted",
    limit_test: int | None = None,
    eval_batch_size: int = 256,
    amp: bool = False,
    download: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Test-set loss terms and accuracy of the model in checkpoint ``path`` (one process).

    ``routing_backend`` overrides the saved one (e.g. ``"reference"`` without the extension).
    """
    checkpoint = load_checkpoint(path)
    saved = TrainConfig.from_dict(checkpoint["train_config"])
    model_config = saved.model
    if routing_backend is not None:
        model_config = dataclasses.replace(model_config, routing_backend=routing_backend)
    config = dataclasses.replace(
        saved,
        model=model_config,
        data_dir=data_dir,
        device=device,
        eval_mask=eval_mask,
        limit_test=limit_test,
        eval_batch_size=eval_batch_size,
        amp=amp,
        download=download,
        progress=progress,
    )
    context = setup_distributed(config.device)
    try:
        if context.is_distributed:
            raise ValueError("evaluate a checkpoint with one process (plain python, not torchrun)")
        check_routing_backend(config.model, context.device)
        _, test_set = load_datasets(config, context, train=False)
        model = model_from_checkpoint(checkpoint, routing_backend=model_config.routing_backend).to(
            context.device
        )
        return evaluate(model, test_set, config, context)
    finally:
        cleanup_distributed()
