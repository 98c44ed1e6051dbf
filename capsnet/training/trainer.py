"""A whole training run: set-up, resume, epochs, evaluation, checkpoints, logs and plots.

``train_mnist.py`` is a command-line front end to :func:`fit`; it can be called from Python
as well. The jobs are elsewhere, one per module: the state and its checkpoint schema
(state.py), the run directory and its crash consistency (run_directory.py), the epoch loop
(loop.py), evaluation (evaluation.py), logging and TensorBoard (logs.py), plots (plots.py).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from capsnet.datasets import get_dataset
from capsnet.training.checkpoint import Checkpoint, read_checkpoint
from capsnet.training.config import TrainConfig
from capsnet.training.data import load_split
from capsnet.training.distributed import (
    DistributedContext,
    StepVote,
    any_rank,
    cleanup_distributed,
    setup_distributed,
)
from capsnet.training.errors import (
    OutputDirError,
    SetupError,
    TrainingDiverged,
    TrainingInterrupted,
)
from capsnet.training.evaluation import evaluate
from capsnet.training.interrupt import GracefulInterrupt, StopRequest
from capsnet.training.logs import ScalarWriter, logger
from capsnet.training.loop import EpochSettings, RunPosition, steps_per_epoch, train_epoch
from capsnet.training.metrics import history_columns, write_history_csv, write_steps_csv
from capsnet.training.models import check_routing_backend, uses_routing
from capsnet.training.plots import save_training_curves
from capsnet.training.run_directory import (
    STEPS_LOG,
    TENSORBOARD_DIR,
    RunDirectory,
    read_resume_checkpoint,
)
from capsnet.training.state import BestEpoch, TrainingState


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the trained bare network (never the DDP wrapper).
        history: one metrics record per finished epoch (the rows of metrics.csv).
        out_dir: where the files went.
        position: where the run ended.
        best: the best epoch, the one best.pt holds.
    """

    model: torch.nn.Module
    history: list[dict[str, Any]]
    out_dir: Path
    position: RunPosition
    best: BestEpoch


def fit(
    config: TrainConfig,
    *,
    resume: str | os.PathLike | Checkpoint | None = None,
    overwrite: bool = False,
    stop: StopRequest | None = None,
    on_step: Callable[[RunPosition], None] | None = None,
) -> FitResult:
    """Train as ``config`` says; under ``torchrun``, with DistributedDataParallel.

    Args:
        config: the run's settings.
        resume: a checkpoint (path or :class:`Checkpoint`) to continue. Its trajectory
            settings must equal ``config``'s (:meth:`TrainConfig.trajectory_differences`);
            with the same seed the result equals an uninterrupted run's, bit for bit on CPU.
        overwrite: a new run may delete an earlier run's files in ``config.out_dir``.
        stop: set it (or press Ctrl-C) to stop after the current step with a checkpoint.
        on_step: called with the run position after every training step.

    Raises:
        SetupError: before training (options, data, output directory, checkpoint).
        TrainingDiverged, OutputWriteError: during training; the last checkpoint is intact.
        TrainingInterrupted: stopped on request; names the checkpoint written.
    """
    context = setup_distributed(config.device)
    run_dir = RunDirectory(config.out_dir)
    try:
        check_routing_backend(config, context.device)
        checkpoint = resume
        if resume is not None and not isinstance(resume, Checkpoint):
            checkpoint = read_resume_checkpoint(resume)
        checkpoint, best_on_disk = _take_over_directory(run_dir, checkpoint, overwrite, context)
        state = TrainingState(config, context.device, context.rank, context.world_size)
        if checkpoint is not None:
            state.load_state_dict(checkpoint.state, str(checkpoint.path))
            if best_on_disk is not None:
                state.best = best_on_disk
        if state.position.epoch >= config.epochs:
            logger.info(
                "%s: already trained %d epoch(s) (--epochs %d): nothing to do",
                checkpoint.path if checkpoint else config.out_dir,
                state.position.epoch,
                config.epochs,
            )
            return _result(state, run_dir)
        if state.reached_target_accuracy():
            logger.info(
                "%s: epoch %d already reached the target test accuracy (%.2f%% >= "
                "--stop-at-accuracy %g): nothing to do",
                checkpoint.path if checkpoint else config.out_dir,
                state.position.epoch,
                100 * state.history[-1]["test_accuracy"],
                config.stop_at_accuracy,
            )
            return _result(state, run_dir)
        if checkpoint is not None:
            logger.info("resumed from %s: %s", checkpoint.path, _describe_position(state))
        train_set = load_split(config, "train", context)
        test_set = load_split(config, "test", context)
        if len(train_set) < context.world_size:
            raise SetupError(
                f"{len(train_set)} training images cannot be shared by {context.world_size} "
                "processes"
            )
        trainer = Trainer(config, context, run_dir, state, train_set, test_set, checkpoint)
        trainer.run(stop if stop is not None else StopRequest(), on_step)
        return _result(state, run_dir)
    finally:
        run_dir.release()
        cleanup_distributed()


def _take_over_directory(
    run_dir: RunDirectory,
    checkpoint: Checkpoint | None,
    overwrite: bool,
    context: DistributedContext,
) -> tuple[Checkpoint | None, BestEpoch | None]:
    """Rank 0 checks, locks and prepares the output directory (other nodes may not see its
    file system); every rank learns whether that worked before anyone loads data."""
    error: SetupError | None = None
    best_on_disk = None
    if context.is_main:
        try:
            run_dir.check_usable()
            run_dir.acquire()
            if checkpoint is None:
                run_dir.start_new_run(overwrite)
            else:
                checkpoint, best_on_disk = run_dir.start_resumed_run(checkpoint)
        except SetupError as caught:
            error = caught
    if any_rank(error is not None, context):
        raise error or OutputDirError(f"rank 0 could not prepare --out-dir {run_dir.path}")
    if checkpoint is not None and not context.is_main:
        checkpoint = read_checkpoint(checkpoint.path)  # as rank 0 left it
    return checkpoint, best_on_disk


def _result(state: TrainingState, run_dir: RunDirectory) -> FitResult:
    return FitResult(state.model, state.history, run_dir.path, state.position, state.best)


def _describe_position(state: TrainingState) -> str:
    position, epochs = state.position, state.config.epochs
    if position.batch_in_epoch == 0:
        return f"{position.epoch} of {epochs} epochs done (global step {position.global_step})"
    return (
        f"epoch {position.epoch + 1} of {epochs}, after its step {position.batch_in_epoch} "
        f"(global step {position.global_step})"
    )


class Trainer:
    """Runs the epochs of one run; :func:`fit` sets it up."""

    def __init__(
        self,
        config: TrainConfig,
        context: DistributedContext,
        run_dir: RunDirectory,
        state: TrainingState,
        train_set,
        test_set,
        resumed_from: Checkpoint | None,
    ) -> None:
        self.config = config
        self.context = context
        self.run_dir = run_dir
        self.state = state
        self.train_set = train_set
        self.test_set = test_set
        self.steps_per_epoch = steps_per_epoch(len(train_set), config.batch_size, context)
        # The newest checkpoint on disk: where a failed run can be resumed from.
        self.last_saved = (
            (resumed_from.path, resumed_from.epoch, resumed_from.batch_in_epoch)
            if resumed_from is not None
            else None
        )
        self.writer: ScalarWriter | None = None

    # -- the run ---------------------------------------------------------------------------
    def run(self, stop: StopRequest, on_step: Callable[[RunPosition], None] | None) -> None:
        config, context, state = self.config, self.context, self.state
        if context.is_main:
            self.run_dir.write_config(config)
        train_model = state.model
        if context.is_distributed:
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            train_model = DistributedDataParallel(state.model, device_ids=device_ids)
        step_loss = functools.partial(state.objective, train_model)
        if config.compile:
            # DDP splits its graph at gradient buckets: one graph only without it.
            step_loss = torch.compile(step_loss, fullgraph=not context.is_distributed)
        vote = StepVote.for_context(context, config.log_every)
        settings = EpochSettings(
            seed=config.seed,
            batch_size=config.batch_size,
            epochs=config.epochs,
            amp=config.amp,
            progress=config.progress,
            log_every=config.log_every,
        )
        # From here on a Ctrl-C saves a checkpoint (the header below tells the user so).
        with GracefulInterrupt(stop, announce=context.is_main):
            self._log_start()
            if context.is_main and config.tensorboard:
                resumed = state.position.global_step > 0
                self.writer = ScalarWriter(
                    self.run_dir / TENSORBOARD_DIR,
                    purge_step=state.position.global_step + 1 if resumed else None,
                )
            try:
                while state.position.epoch < config.epochs:
                    started = time.perf_counter()
                    decision = train_epoch(
                        step_loss=step_loss,
                        parameters_owner=train_model,
                        optimizer=state.optimizer,
                        scaler=state.scaler,
                        train_set=self.train_set,
                        settings=settings,
                        context=context,
                        position=state.position,
                        sums=state.epoch_sums,
                        step_log=state.step_log,
                        vote=vote,
                        stop=stop,
                        on_step=on_step,
                    )
                    state.epoch_seconds_so_far += time.perf_counter() - started
                    if not decision.diverged and not decision.stop:
                        decision = vote.settle(stop.requested)  # the lagged vote, if any
                    if decision.diverged:
                        raise self._diverged("the training loss became NaN or infinite")
                    if state.position.batch_in_epoch < self.steps_per_epoch:
                        self._stop_mid_epoch()
                    self._finish_epoch()
                    if state.reached_target_accuracy():
                        logger.info(
                            "test accuracy %.2f%% reached --stop-at-accuracy %g after epoch %d: "
                            "stopping (%s holds this epoch)",
                            100 * state.history[-1]["test_accuracy"], config.stop_at_accuracy,
                            state.position.epoch, self.run_dir.last,
                        )  # fmt: skip
                        break
                    asked = decision.stop or any_rank(stop.requested, context)
                    if asked and state.position.epoch < config.epochs:
                        raise TrainingInterrupted(self._last_path(), state.position)
            finally:
                if self.writer is not None:
                    self.writer.close()

    def _log_start(self) -> None:
        config, context, state = self.config, self.context, self.state
        num_params = sum(p.numel() for p in state.model.parameters())
        processes = f" x {context.world_size} processes" if context.is_distributed else ""
        per_process = " per process" if context.is_distributed else ""
        compiled = ", compiled" if config.compile else ""
        routing = f", routing {config.routing}" if uses_routing(config) else ""
        logger.info(
            "%s on %s: %s parameters%s%s, device %s%s; %d training examples (%d "
            "steps/epoch of %d%s), %d test examples; writing to %s (Ctrl-C saves a checkpoint)",
            type(state.model).__name__, config.dataset, f"{num_params:,}", routing, compiled,
            context.device, processes, len(self.train_set), self.steps_per_epoch,
            config.batch_size, per_process, len(self.test_set), self.run_dir.path,
        )  # fmt: skip

    def _finish_epoch(self) -> None:
        config, context, state = self.config, self.context, self.state
        train_metrics = state.epoch_sums.reduced(context).averages()
        eval_started = time.perf_counter()
        test_metrics = evaluate(
            state.model,
            state.objective,
            self.test_set,
            context,
            batch_size=config.eval_batch_size,
            mask=config.eval_mask,
            amp=config.amp,
            progress=config.progress,
        )
        bad = [f"test {name}" for name, value in test_metrics.items() if not _finite(value)]
        bad += [f"train {name}" for name, value in train_metrics.items() if not _finite(value)]
        if bad:
            raise self._diverged(f"the {', '.join(bad)} of epoch {state.position.epoch + 1} "
                                 "is NaN or infinite")  # fmt: skip
        lr = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step()
        epoch = state.position.epoch + 1
        record = {
            "epoch": epoch,
            "global_step": state.position.global_step,
            "lr": lr,
            **{f"train_{key}": value for key, value in train_metrics.items()},
            **{f"test_{key}": value for key, value in test_metrics.items()},
            "test_error_percent": 100.0 * (1.0 - test_metrics["accuracy"]),
            "epoch_seconds": state.epoch_seconds_so_far + time.perf_counter() - eval_started,
        }
        state.history.append(record)
        state.position = RunPosition(epoch, 0, state.position.global_step)
        state.epoch_sums = state.new_sums()
        state.epoch_seconds_so_far = 0.0
        improved = test_metrics["accuracy"] > state.best.accuracy
        if improved:
            state.best = BestEpoch(epoch, test_metrics["accuracy"])
        self._check_finite_state()
        checkpoint = state.state_dict()
        if context.is_main:
            self.run_dir.save_epoch_end(checkpoint, improved)
            self.last_saved = (self.run_dir.last, epoch, 0)
            self._write_logs(record)
        logger.info(_epoch_summary(record, config.epochs, improved))

    def _write_logs(self, record: dict[str, Any]) -> None:
        state, run_dir = self.state, self.run_dir
        rows = state.step_log.flush()
        columns = history_columns(state.objective.term_names)
        write_history_csv(run_dir / "metrics.csv", state.history, columns)
        write_steps_csv(run_dir / STEPS_LOG, state.step_log, self.steps_per_epoch)
        save_training_curves(
            run_dir / "curves.png", state.history, rows, state.step_log.columns,
            self.steps_per_epoch,
        )  # fmt: skip
        if self.writer is not None:
            self.writer.steps(
                state.step_log.columns, state.step_log.last_rows(self._previous_epoch_end())
            )
            self.writer.epoch(record, record["global_step"])
        draws = getattr(state.objective, "save_reconstructions", None) is not None
        if draws and getattr(state.model, "decoder", None) is not None:
            if self.config.num_reconstructions:
                self._plot_reconstructions(record["epoch"])

    def _previous_epoch_end(self) -> int:
        history = self.state.history
        return history[-2]["global_step"] if len(history) > 1 else 0

    @torch.no_grad()
    def _plot_reconstructions(self, epoch: int) -> None:
        count = min(self.config.num_reconstructions, len(self.test_set))
        images, targets = self.test_set.batch(torch.arange(count))
        model = self.state.model.eval()
        several = get_dataset(self.config.dataset).labels_per_example > 1
        source = "classes' capsules, one colour per digit" if several else "class's capsule"
        self.state.objective.save_reconstructions(
            self.run_dir.reconstruction_plot(epoch),
            model,
            images,
            targets,
            self.config.eval_mask,
            title=f"epoch {epoch}: test images (top) and reconstructions from the "
            f"{self.config.eval_mask} {source} (bottom)",
        )

    def _stop_mid_epoch(self) -> None:
        self._check_finite_state()
        # The unfinished epoch's sums over all ranks, explicitly: a collective on every rank.
        checkpoint = self.state.state_dict(epoch_sums=self.state.epoch_sums.reduced(self.context))
        path = None
        if self.context.is_main:
            path = self.run_dir.save_interrupted(checkpoint)
        raise TrainingInterrupted(path, self.state.position)

    def _check_finite_state(self) -> None:
        where = self.state.non_finite_tensor()
        if where is not None:
            raise self._diverged(f"{where} became NaN or infinite")

    def _diverged(self, what: str) -> TrainingDiverged:
        position = self.state.position
        if self.last_saved is None:
            advice = "no checkpoint was written yet; a new run with a smaller --lr may converge"
        else:
            path, epoch, step = self.last_saved
            at = f"end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1}, step {step}"
            advice = (
                f"the last checkpoint, {path} ({at}), is intact and resumes with --resume "
                f"{path}; a new run (another --out-dir) with a smaller --lr may converge"
            )
        return TrainingDiverged(
            f"training diverged: {what} (epoch {position.epoch + 1}, by step "
            f"{position.batch_in_epoch}, global step {position.global_step}). Nothing was "
            f"saved from it; {advice}."
        )

    def _last_path(self) -> Path | None:
        return self.run_dir.last if self.context.is_main else None


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


# Short names of loss terms in the printed epoch summary.
_TERM_LABELS = {"margin_loss": "margin", "reconstruction_loss": "recon", "digit_accuracy": "digits"}


def describe_metrics(metrics: dict[str, Any], prefix: str = "", accuracy: bool = True) -> str:
    """``loss 0.1234 (margin 0.1000, recon 0.0234) acc 97.00%`` from an objective's averaged
    terms (keys ``prefix + name``); accuracies are shown in percent."""
    names = [key.removeprefix(prefix) for key in metrics if key.startswith(prefix)]
    terms = [name for name in names if name not in ("loss", "accuracy", "error_percent")]
    shown = []
    for name in terms:
        value = metrics[prefix + name]
        label = _TERM_LABELS.get(name, name)
        shown.append(f"{label} {100 * value:.2f}%" if "accuracy" in name else f"{label} {value:.4f}")
    details = f" ({', '.join(shown)})" if shown else ""
    shown_accuracy = f" acc {100 * metrics[prefix + 'accuracy']:.2f}%" if accuracy else ""
    return f"loss {metrics[prefix + 'loss']:.4f}{details}{shown_accuracy}"


def _epoch_summary(record: dict[str, Any], epochs: int, improved: bool) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}  train {describe_metrics(record, 'train_')}  |  "
        f"test {describe_metrics(record, 'test_')}{' (best)' if improved else ''}  |  "
        f"lr {record['lr']:.2e}  {record['epoch_seconds']:.1f} s"
    )
