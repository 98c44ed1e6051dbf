"""The state of a training run, and the checkpoint schema: :class:`TrainingState`.

``TrainingState.state_dict()`` is a checkpoint; ``load_state_dict()`` checks one
completely (structure, types, the network's weights against its config, the optimiser
state against the parameters, the random generator states) before changing anything, so a
damaged or inconsistent file is a :class:`CheckpointError` naming the key, never a
traceback from deep inside torch. This module is the only place that knows the schema.

Checkpoint keys (format 2; all tensors and plain Python values, so ``torch.load(...,
weights_only=True)`` reads it without unpickling arbitrary objects):

    format_version      int         FORMAT_VERSION
    train_config        dict        TrainConfig.to_dict(), the network included
    model               state dict  the bare network's (never DDP's "module."-prefixed one)
    optimizer, scheduler, grad_scaler   state dicts (grad_scaler None unless float16 AMP)
    epoch               int         the epoch in progress, 0-based (= epochs finished when
                                    batch_in_epoch is 0)
    batch_in_epoch      int         training steps done in that epoch
    global_step         int         optimiser steps since the run began
    epoch_sums          dict|None   the unfinished epoch's metric sums over all ranks
    epoch_seconds_so_far float      time spent on the unfinished epoch
    history             list[dict]  one metrics record per finished epoch (metrics.csv rows)
    best_epoch          int|None    the epoch whose weights best.pt holds
    best_test_accuracy  float       its test accuracy (-1.0 when no epoch finished)
    step_log            Tensor      [steps, columns] float64: every step's batch metrics
    world_size          int         processes that trained it (a mid-epoch resume needs as many)
    rng                 dict        global generator states (rng_state.py)

Format 1 (capsnet 0.1.0's first training program) kept the routing backend in the network's
config and had no best_epoch and no step_log; it is upgraded when read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from capsnet.training.config import ROUTING_BACKENDS, TrainConfig
from capsnet.training.errors import CheckpointError, ConfigError, ResumeError
from capsnet.training.loop import RunPosition
from capsnet.training.metrics import MetricSums, StepLog
from capsnet.training.models import build_model, build_objective
from capsnet.training.precision import make_grad_scaler
from capsnet.training.rng_state import capture_rng_state, restore_rng_state

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
_FORMAT_1_KEYS = (
    "format_version",
    "model",
    "optimizer",
    "scheduler",
    "train_config",
    "epoch",
    "batch_in_epoch",
    "global_step",
    "history",
)


@dataclass
class BestEpoch:
    """The epoch with the highest test accuracy so far: the one ``best.pt`` holds."""

    epoch: int | None = None
    accuracy: float = -1.0


class TrainingState:
    """Everything a run needs to continue: the network, Adam, the learning-rate schedule,
    the loss scaler, the position, the unfinished epoch's sums and step log, the metrics
    history and the best epoch.

    Args:
        config: the run's settings (the network is built from them, seeded by ``seed``).
        device: where the network and the sums live.
        rank, world_size: this process among the run's processes.
    """

    def __init__(
        self, config: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1
    ) -> None:
        self.config = config
        self.device = device
        self.rank = rank
        self.world_size = world_size
        torch.manual_seed(config.seed)  # the initial weights (the same on every rank)
        self.model = build_model(config).to(device)
        self.objective = build_objective(config)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        # Per-epoch exponential decay (stepped after each epoch).
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(
            self.optimizer, gamma=config.lr_decay
        )
        self.scaler = make_grad_scaler(device, config.amp)
        self.position = RunPosition()
        self.epoch_sums = self.new_sums()
        self.step_log = StepLog(self.objective.term_names, device)
        self.history: list[dict[str, Any]] = []
        self.best = BestEpoch()
        self.epoch_seconds_so_far = 0.0

    def new_sums(self) -> MetricSums:
        return MetricSums(self.objective.term_names, self.device)

    @property
    def finished(self) -> bool:
        return self.position.epoch >= self.config.epochs and self.position.batch_in_epoch == 0

    def reached_target_accuracy(self) -> bool:
        """The last finished epoch's test accuracy reached ``--stop-at-accuracy`` (and the
        run stands at that epoch's end): early stopping ends the run there."""
        target = self.config.stop_at_accuracy
        if target is None or not self.history or self.position.batch_in_epoch != 0:
            return False
        # Accuracies are ratios of counts: allow for the rounding of 100 * ratio.
        return 100.0 * self.history[-1]["test_accuracy"] >= target - 1e-9

    # -- saving --------------------------------------------------------------------------
    def state_dict(self, epoch_sums: MetricSums | None = None) -> dict[str, Any]:
        """The checkpoint. ``epoch_sums``: the unfinished epoch's sums over all ranks (pass
        ``state.epoch_sums.reduced(context)`` with several processes; default: this rank's)."""
        sums = epoch_sums if epoch_sums is not None else self.epoch_sums
        return {
            "format_version": FORMAT_VERSION,
            "train_config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.position.epoch,
            "batch_in_epoch": self.position.batch_in_epoch,
            "global_step": self.position.global_step,
            "epoch_sums": sums.state_dict() if self.position.batch_in_epoch else None,
            "epoch_seconds_so_far": self.epoch_seconds_so_far,
            "history": [dict(record) for record in self.history],
            "best_epoch": self.best.epoch,
            "best_test_accuracy": self.best.accuracy,
            "step_log": self.step_log.state_dict(),
            "world_size": self.world_size,
            "rng": capture_rng_state(),
        }

    def non_finite_tensor(self) -> str | None:
        """The name of the first parameter or optimiser state that holds NaN or infinity
        (None when all are finite). Waits for the device: call it before saving."""
        names = {}
        for name, parameter in self.model.named_parameters():
            names[id(parameter)] = name
            if not torch.isfinite(parameter).all():
                return f"parameter {name}"
        for parameter, state in self.optimizer.state.items():
            for key, value in state.items():
                if torch.is_tensor(value) and not torch.isfinite(value).all():
                    return f"Adam's {key} of {names.get(id(parameter), 'a parameter')}"
        return None

    # -- loading -------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Continue from checkpoint ``state`` (as returned by :func:`parse_checkpoint`).

        Raises:
            ResumeError: the checkpoint belongs to a run with other trajectory settings, or
                was saved mid-epoch by another number of processes.
            CheckpointError: a part of it does not fit this network/optimiser; nothing of
                the state was changed then.
        """
        saved = TrainConfig.from_dict(state["train_config"])
        different = saved.trajectory_differences(self.config)
        if different:
            details = "; ".join(
                f"{name}: checkpoint {saved.lookup(name)!r}, requested {self.config.lookup(name)!r}"
                for name in different
            )
            raise ResumeError(
                f"cannot resume {source} with different training settings ({details}). A "
                "resumed run keeps the settings it started with; start a new run (another "
                "--out-dir) to change them."
            )
        if state["batch_in_epoch"] > 0 and state["world_size"] != self.world_size:
            raise ResumeError(
                f"{source} was saved mid-epoch by {state['world_size']} process(es); resume it "
                f"with as many (this run has {self.world_size}), or from an end-of-epoch "
                "checkpoint"
            )
        self._check_fits(state, source)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["grad_scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        self.position = RunPosition(
            state["epoch"], state["batch_in_epoch"], state["global_step"]
        )
        self.history = [dict(record) for record in state["history"]]
        self.best = BestEpoch(state["best_epoch"], float(state["best_test_accuracy"]))
        self.epoch_sums = self.new_sums()
        # The unfinished epoch's sums were reduced over ranks when saved: one rank holds them.
        if state["epoch_sums"] and self.rank == 0:
            self.epoch_sums.load_state_dict(state["epoch_sums"])
        self.epoch_seconds_so_far = float(state["epoch_seconds_so_far"])
        self.step_log.load_state_dict(state["step_log"])
        if state["rng"] is not None:
            restore_rng_state(state["rng"])

    def _check_fits(self, state: dict[str, Any], source: str) -> None:
        """Everything ``load_state_dict`` would find wrong half-way, found before it starts."""
        where = f"{source}: "
        check_weights(state["model"], self.model, source)
        _check_optimizer(state["optimizer"], self.optimizer, where)
        _check_same_layout(
            state["scheduler"], self.scheduler.state_dict(), where + "scheduler"
        )
        if state["grad_scaler"] and self.scaler.is_enabled():
            _check_same_layout(
                state["grad_scaler"], self.scaler.state_dict(), where + "grad_scaler"
            )
        names = self.new_sums().names
        if state["epoch_sums"] is not None:
            _expect(
                set(state["epoch_sums"]) == set(names)
                and all(_is_number(v) for v in state["epoch_sums"].values()),
                where + f"epoch_sums must map {list(names)} to numbers",
            )
        columns = len(self.step_log.columns)
        log = state["step_log"]
        _expect(
            log.dim() == 2 and log.shape[1] == columns and log.is_floating_point(),
            where + f"step_log must be a float [steps, {columns}] tensor, got "
            f"{log.dtype} {tuple(log.shape)}",
        )
        _expect(bool(torch.isfinite(log).all()), where + "step_log holds NaN or infinity")


# -- reading: upgrade and structural checks ------------------------------------------------


def parse_checkpoint(raw: object, source: str) -> tuple[dict[str, Any], TrainConfig]:
    """A loaded checkpoint upgraded to the current format and checked for structure and
    types; returns it with its TrainConfig.

    Raises:
        CheckpointError: naming ``source`` and the key that is wrong.
    """
    where = f"{source}: "
    _expect(
        isinstance(raw, dict),
        f"{source} is not a capsnet training checkpoint (it holds a {type(raw).__name__}, "
        "not a dict)",
    )
    if "format_version" not in raw:
        raise CheckpointError(
            f"{source} is not a capsnet training checkpoint: no format_version (keys: "
            f"{sorted(map(str, raw))[:12]})"
        )
    version = raw["format_version"]
    _expect(
        _is_int(version) and version in READABLE_FORMATS,
        f"{source} has checkpoint format {version!r}; this capsnet reads formats "
        f"{', '.join(map(str, READABLE_FORMATS))} (a newer capsnet wrote it?)",
    )
    missing = [key for key in _FORMAT_1_KEYS if key not in raw]
    _expect(not missing, f"{source} is not a complete capsnet training checkpoint: missing {missing}")
    state = _upgrade_format_1(raw, where) if version == 1 else dict(raw)
    _expect(isinstance(state["train_config"], dict), where + "train_config must be a dict")
    try:
        config = TrainConfig.from_dict(state["train_config"])
    except ConfigError as error:
        raise CheckpointError(f"{where}train_config: {error}") from None
    except TypeError as error:
        raise CheckpointError(f"{where}train_config: {error}") from None
    _check_structure(state, where)
    return state, config


def _upgrade_format_1(raw: dict[str, Any], where: str) -> dict[str, Any]:
    state = dict(raw)
    config = raw["train_config"]
    _expect(isinstance(config, dict), where + "train_config must be a dict")
    config = dict(config)
    _expect(isinstance(config.get("model"), dict), where + "train_config.model must be a dict")
    model = dict(config["model"])
    backend = model.pop("routing_backend", "fused")
    config["model"] = model
    config["routing"] = backend if backend in ROUTING_BACKENDS else "fused"
    state["train_config"] = config
    state["format_version"] = FORMAT_VERSION
    history = raw["history"]
    best = raw.get("best_test_accuracy", -1.0)
    best_epoch = None
    if isinstance(history, list):
        for record in history:
            if isinstance(record, dict) and record.get("test_accuracy") == best:
                best_epoch = record.get("epoch")
                break
    state.setdefault("best_test_accuracy", -1.0)
    state["best_epoch"] = best_epoch
    state["step_log"] = torch.empty(0, 5, dtype=torch.float64)
    state.setdefault("epoch_sums", None)
    state.setdefault("epoch_seconds_so_far", 0.0)
    state.setdefault("grad_scaler", None)
    state.setdefault("world_size", 1)
    state.setdefault("rng", None)
    return state


def _check_structure(state: dict[str, Any], where: str) -> None:
    for key in ("epoch", "batch_in_epoch", "global_step"):
        _expect(
            _is_int(state[key]) and state[key] >= 0,
            where + f"{key} must be an int >= 0, got {state[key]!r}",
        )
    _expect(
        state["global_step"] >= state["batch_in_epoch"],
        where + f"global_step {state['global_step']} is below batch_in_epoch "
        f"{state['batch_in_epoch']}",
    )
    _expect(
        _is_int(state.get("world_size")) and state["world_size"] >= 1,
        where + f"world_size must be an int >= 1, got {state.get('world_size')!r}",
    )
    model = state["model"]
    _expect(
        isinstance(model, dict)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()),
        where + "model must be a state dict (names to tensors)",
    )
    optimizer = state["optimizer"]
    _expect(
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list),
        where + "optimizer must be a state dict with 'state' and 'param_groups'",
    )
    _expect(isinstance(state["scheduler"], dict), where + "scheduler must be a state dict")
    _expect(
        state.get("grad_scaler") is None or isinstance(state["grad_scaler"], dict),
        where + "grad_scaler must be a state dict or None",
    )
    _expect(
        state.get("epoch_sums") is None or isinstance(state["epoch_sums"], dict),
        where + "epoch_sums must be a dict or None",
    )
    _expect(
        state["batch_in_epoch"] == 0 or state.get("epoch_sums") is not None,
        where + "a mid-epoch checkpoint (batch_in_epoch > 0) must hold epoch_sums",
    )
    seconds = state.get("epoch_seconds_so_far")
    _expect(
        _is_number(seconds) and seconds >= 0,
        where + f"epoch_seconds_so_far must be a number >= 0, got {seconds!r}",
    )
    history = state["history"]
    _expect(isinstance(history, list), where + "history must be a list of per-epoch records")
    _expect(
        len(history) == state["epoch"],
        where + f"history has {len(history)} records for {state['epoch']} finished epochs",
    )
    for index, record in enumerate(history):
        _expect(
            isinstance(record, dict)
            and record.get("epoch") == index + 1
            and _is_number(record.get("test_accuracy")),
            where + f"history[{index}] must be the record of epoch {index + 1} with a "
            "test_accuracy",
        )
    best_epoch, best_accuracy = state.get("best_epoch"), state.get("best_test_accuracy")
    _expect(_is_number(best_accuracy), where + "best_test_accuracy must be a number")
    if best_epoch is not None:
        _expect(
            _is_int(best_epoch) and 1 <= best_epoch <= len(history),
            where + f"best_epoch must be an epoch in 1..{len(history)} or None, got "
            f"{best_epoch!r}",
        )
        _expect(
            history[best_epoch - 1]["test_accuracy"] == best_accuracy,
            where + f"best_test_accuracy {best_accuracy} is not epoch {best_epoch}'s",
        )
    log = state.get("step_log")
    _expect(torch.is_tensor(log), where + "step_log must be a tensor")
    _expect(
        log.dim() == 2 and log.shape[0] <= state["global_step"],
        where + f"step_log must be [steps <= global_step, columns], got {tuple(log.shape)}",
    )
    rng = state.get("rng")
    if rng is not None:
        _expect(isinstance(rng, dict), where + "rng must be a dict of generator states")
        cpu_state = rng.get("torch_cpu")
        try:
            torch.Generator().set_state(cpu_state)
        except (TypeError, RuntimeError, ValueError):
            raise CheckpointError(
                where + "rng['torch_cpu'] is not a CPU random generator state"
            ) from None


def check_weights(saved: dict[str, Any], model: torch.nn.Module, source: str) -> None:
    """Raise CheckpointError unless ``saved`` holds finite weights of ``model``'s shapes."""
    where = f"{source}: "
    expected = model.state_dict()
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    prefix = where + "model weights do not match the network in train_config: "
    _expect(not missing, prefix + f"missing {missing[:5]}")
    _expect(not unexpected, prefix + f"unexpected {unexpected[:5]}")
    for name, tensor in expected.items():
        value = saved[name]
        _expect(
            tuple(value.shape) == tuple(tensor.shape),
            prefix + f"{name} has shape {tuple(value.shape)}, the network needs "
            f"{tuple(tensor.shape)}",
        )
        _expect(
            value.is_floating_point() == tensor.is_floating_point(),
            prefix + f"{name} is {value.dtype}, the network needs {tensor.dtype}",
        )
        _expect(
            not value.is_floating_point() or bool(torch.isfinite(value).all()),
            where + f"model weight {name} holds NaN or infinity: saved after the run diverged; "
            "resume from an earlier checkpoint",
        )


def _check_optimizer(saved: dict[str, Any], optimizer: torch.optim.Optimizer, where: str) -> None:
    expected = optimizer.state_dict()
    groups, expected_groups = saved["param_groups"], expected["param_groups"]
    prefix = where + "optimizer state does not match the network: "
    _expect(
        len(groups) == len(expected_groups)
        and all(
            isinstance(group, dict) and group.get("params") == reference["params"]
            for group, reference in zip(groups, expected_groups, strict=False)
        ),
        prefix + "its parameter groups list other parameters",
    )
    for group, reference in zip(groups, expected_groups, strict=True):
        for key, value in reference.items():
            if key == "params":
                continue
            _expect(key in group, prefix + f"param_groups lacks {key!r}")
            if _is_number(value):
                _expect(
                    _is_number(group[key]) and math.isfinite(group[key]),
                    prefix + f"param_groups {key!r} must be a finite number, got {group[key]!r}",
                )
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in saved["state"].items():
        _expect(
            _is_int(index) and 0 <= index < len(parameters) and isinstance(entry, dict),
            prefix + f"state for parameter {index!r} does not exist",
        )
        for key, value in entry.items():
            _expect(torch.is_tensor(value), prefix + f"state {key} of parameter {index} is not a tensor")
            if key == "step":
                _expect(value.numel() == 1, prefix + f"step of parameter {index} is not a scalar")
            else:
                _expect(
                    value.shape == parameters[index].shape,
                    prefix + f"{key} of parameter {index} has shape {tuple(value.shape)}, the "
                    f"parameter has {tuple(parameters[index].shape)}",
                )
            _expect(
                bool(torch.isfinite(value).all()),
                where + f"optimizer state {key} of parameter {index} holds NaN or infinity",
            )


def _check_same_layout(saved: dict[str, Any], expected: dict[str, Any], what: str) -> None:
    _expect(
        set(saved) == set(expected),
        f"{what} has keys {sorted(saved)}, expected {sorted(expected)}",
    )
    for key, value in expected.items():
        other = saved[key]
        same_kind = (_is_number(value) and _is_number(other)) or type(value) is type(other)
        _expect(same_kind, f"{what}[{key!r}] must be like {value!r}, got {other!r}")
        if _is_number(other) and not isinstance(other, bool):
            _expect(math.isfinite(other), f"{what}[{key!r}] must be finite, got {other!r}")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckpointError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
