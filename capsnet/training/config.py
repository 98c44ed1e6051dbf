"""The training run's settings: one dataclass, and the single source of the command line.

Each field's metadata (:class:`Setting`) holds its command-line flag, help text, option
group and whether it is a *trajectory* field. ``capsnet.training.cli`` builds
``train_mnist.py``'s parser from these, and docs/TRAINING.md's option table is rendered
from that parser (a test compares them), so an option, its default and its help are
written once, here.

Trajectory fields decide which weights a run produces (seed, batch size, learning rate,
the network, ...); a resumed run must keep them, or it would not continue the same run.
The others (epochs, device, routing backend, output directory, display) may change between
a run and its resumption.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from capsnet.datasets import DATA_DIR_ENV, dataset_names, get_dataset
from capsnet.layers import DECODER_INPUTS
from capsnet.losses import RECONSTRUCTION_WEIGHT
from capsnet.model import CapsNetConfig, ConfigFieldError
from capsnet.training.errors import ConfigError

EVAL_MASKS = ("predicted", "true")
ROUTING_BACKENDS = ("fused", "reference")
ARCHITECTURES = ("capsnet", "cnn-baseline")
# The network fields the CNN baseline reads; the others are CapsNet's own.
CNN_MODEL_FIELDS = ("input_shape", "num_classes")
GROUPS = ("data", "model", "optimisation", "run")


@dataclass(frozen=True)
class Setting:
    """How a config field appears on the command line and in the docs.

    Attributes:
        flag: the option, e.g. ``"--batch-size"``; booleans also get ``--no-...``.
        help: one line.
        group: one of :data:`GROUPS`.
        trajectory: the field decides the weights a run produces (kept on resume).
        value_type: ``int``, ``float`` or ``str`` for fields whose default is None.
        metavar: the value's name in ``--help``.
        choices: the allowed values (a tuple, or a function returning one).
        default_text: how to show the default when ``repr`` would not say it well.
    """

    flag: str
    help: str
    group: str
    trajectory: bool = False
    value_type: type | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | Any = None
    default_text: str | None = None

    def allowed(self) -> tuple[str, ...] | None:
        return self.choices() if callable(self.choices) else self.choices


def _setting(default: Any = dataclasses.MISSING, **metadata: Any):
    return field(default=default, metadata={"setting": Setting(**metadata)})


# The network's fields that the command line exposes (the rest keep the paper's values).
MODEL_SETTINGS = {
    "input_shape": Setting(
        "--image-size",
        "pad images with zeros to SxS (the canvas: e.g. 40x40 for MNIST digits as in "
        "expanded MNIST and affNIST, Sec. 5.2)",
        "data",
        trajectory=True,
        value_type=int,
        metavar="S",
        default_text="the data set's: 28 for mnist, 36 for multimnist, 40 for expanded-mnist",
    ),
    "routing_iterations": Setting(
        "--routing-iterations", "routing iterations (Sec. 4, Table 1)", "model", trajectory=True
    ),
    "decoder_input": Setting(
        "--decoder-input",
        "the decoder sees all capsules with all but one zeroed (masked, the paper) or only "
        "that capsule's components (target)",
        "model",
        trajectory=True,
        choices=DECODER_INPUTS,
    ),
    "reconstruction": Setting(
        "--reconstruction",
        "reconstruction decoder and loss (Sec. 4.1); --no-reconstruction: margin loss only",
        "model",
        trajectory=True,
    ),
    "capsule_bias": Setting(
        "--capsule-bias",
        "learned bias on the digit capsules (as in the official code)",
        "model",
        trajectory=True,
    ),
}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; defaults follow the paper and its code.

    The help text of each field is in its :class:`Setting` (``python train_mnist.py --help``
    or docs/TRAINING.md show them all). ``model`` is the network's architecture
    (:class:`capsnet.model.CapsNetConfig`).

    Raises:
        ConfigError: naming the field, for any value a run cannot use (checked on
            construction, before any data is loaded).
    """

    model: CapsNetConfig = field(default_factory=CapsNetConfig)
    # data
    dataset: str = _setting(
        "mnist", flag="--dataset", help="the data set", group="data", trajectory=True,
        choices=dataset_names,
    )  # fmt: skip
    data_dir: str | None = _setting(
        None, flag="--data-dir", help="directory holding MNIST/raw", group="data",
        value_type=str, metavar="DIR", default_text=f"${DATA_DIR_ENV}, else ./data",
    )  # fmt: skip
    download: bool = _setting(
        False, flag="--download", help="download the data set if it is missing", group="data"
    )
    limit_train: int | None = _setting(
        None, flag="--limit-train",
        help="train on the first N training images only (the digits synthetic sets draw from)",
        group="data", trajectory=True, value_type=int, metavar="N", default_text="all",
    )  # fmt: skip
    limit_test: int | None = _setting(
        None, flag="--limit-test", group="data",
        help="test on the first N test images only (synthetic sets: the first N test digits, "
        "--test-copies examples each)",
        value_type=int, metavar="N", default_text="all",
    )  # fmt: skip
    max_shift: int | None = _setting(
        None, flag="--max-shift", group="data", trajectory=True, value_type=int,
        default_text="the data set's: 2 for mnist (Sec. 5), 4 for multimnist (Sec. 6), 6 for "
        "expanded-mnist (anywhere on 40x40)",
        help="random shift of training images in pixels, zero-padded; for multimnist and "
        "expanded-mnist, the range of each digit's random placement",
    )  # fmt: skip
    test_copies: int | None = _setting(
        None, flag="--test-copies", group="data", value_type=int, metavar="K",
        default_text="the data set's: 10 for multimnist, 1 otherwise",
        help="examples generated from each test digit by the synthetic sets: multimnist test "
        "pairs (10: 100,000 pairs; the paper's 1000: 10M), expanded-mnist placements and "
        "affine copies",
    )  # fmt: skip
    # model (the architecture's own options are in MODEL_SETTINGS)
    architecture: str = _setting(
        "capsnet", flag="--model", group="model", trajectory=True, choices=ARCHITECTURES,
        help="the network to train: capsnet, or cnn-baseline (the paper's baseline CNN, "
        "Sec. 5: 35.4M parameters, cross-entropy)",
    )  # fmt: skip
    routing: str = _setting(
        "fused", flag="--routing", group="model", choices=ROUTING_BACKENDS,
        help="routing implementation: the compiled kernel (fused) or pure PyTorch (reference), "
        "same weights; may change on resume",
    )  # fmt: skip
    # optimisation
    epochs: int = _setting(
        50, flag="--epochs", help="total epochs of the run (a resumed run trains up to this)",
        group="optimisation",
    )  # fmt: skip
    batch_size: int = _setting(
        128, flag="--batch-size", help="training images per step, per process",
        group="optimisation", trajectory=True,
    )  # fmt: skip
    eval_batch_size: int = _setting(
        256, flag="--eval-batch-size", help="test images per forward pass (memory only)",
        group="optimisation",
    )  # fmt: skip
    lr: float = _setting(
        1e-3, flag="--lr", help="Adam's learning rate", group="optimisation", trajectory=True
    )
    lr_decay: float = _setting(
        0.9, flag="--lr-decay", help="learning-rate factor applied after every epoch",
        group="optimisation", trajectory=True,
    )  # fmt: skip
    reconstruction_weight: float = _setting(
        RECONSTRUCTION_WEIGHT, flag="--reconstruction-weight", group="optimisation",
        trajectory=True, help="scale of the reconstruction loss (Sec. 4.1)",
    )  # fmt: skip
    stop_at_accuracy: float | None = _setting(
        None, flag="--stop-at-accuracy", group="optimisation", value_type=float,
        metavar="PERCENT", default_text="off",
        help="early stopping: end the run after the first epoch whose test accuracy reaches "
        "PERCENT (to compare networks at matched accuracy, Sec. 5.2)",
    )  # fmt: skip
    seed: int = _setting(
        0, flag="--seed", help="seeds the initial weights, batch order and shifts",
        group="optimisation", trajectory=True,
    )  # fmt: skip
    amp: bool = _setting(
        False, flag="--amp", group="optimisation", trajectory=True,
        help="mixed precision: bfloat16 (float16 with loss scaling on GPUs without it); "
        "routing stays float32",
    )  # fmt: skip
    compile: bool = _setting(
        False, flag="--compile", group="optimisation",
        help="compile the training step with torch.compile (one graph: forward, loss, "
        "backward)",
    )  # fmt: skip
    # run
    device: str = _setting(
        "auto", flag="--device", help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N",
        group="run",
    )  # fmt: skip
    out_dir: str = _setting(
        "runs/mnist", flag="--out-dir", metavar="DIR", group="run",
        help="checkpoints, logs and plots (with --resume: the checkpoint's directory)",
    )  # fmt: skip
    eval_mask: str = _setting(
        "predicted", flag="--eval-mask", group="run", choices=EVAL_MASKS,
        help="class whose capsule the decoder sees at test time",
    )  # fmt: skip
    progress: bool = _setting(True, flag="--progress", help="progress bars", group="run")
    log_every: int = _setting(
        10, flag="--log-every", metavar="N", group="run",
        help="progress-bar refresh, and stop/divergence checks on a GPU or with several "
        "processes, every N steps",
    )  # fmt: skip
    num_reconstructions: int = _setting(
        8, flag="--num-reconstructions", metavar="N", group="run",
        help="test images in each epoch's reconstruction plot",
    )  # fmt: skip
    tensorboard: bool = _setting(
        True, flag="--tensorboard", group="run",
        help="write TensorBoard event files to OUT_DIR/tensorboard (when the tensorboard "
        "package is installed)",
    )  # fmt: skip

    def __post_init__(self) -> None:
        model = self.model
        if isinstance(model, dict):
            try:
                model = CapsNetConfig.from_dict(model)
            except ConfigFieldError as error:
                raise ConfigError.from_field_error(error, "model") from None
            except TypeError as error:  # a field given a value of the wrong kind
                raise ConfigError("model", f"is not a valid CapsNetConfig: {error}") from None
            object.__setattr__(self, "model", model)
        elif not isinstance(model, CapsNetConfig):
            raise ConfigError("model", f"must be a CapsNetConfig or a dict, got {model!r}")
        for name, minimum in (
            ("epochs", 1),
            ("batch_size", 1),
            ("eval_batch_size", 1),
            ("log_every", 1),
            ("seed", 0),
            ("num_reconstructions", 0),
        ):
            _require_int(name, getattr(self, name), minimum)
        for name, minimum in (("limit_train", 1), ("limit_test", 1), ("test_copies", 1),
                              ("max_shift", 0)):  # fmt: skip
            if getattr(self, name) is not None:
                _require_int(name, getattr(self, name), minimum)
        if self.stop_at_accuracy is not None:
            _require_number(
                "stop_at_accuracy", self.stop_at_accuracy, "a percentage in (0, 100]",
                lambda v: 0 < v <= 100,
            )  # fmt: skip
        _require_number("lr", self.lr, "a positive finite number", lambda v: v > 0)
        _require_number("lr_decay", self.lr_decay, "a number in (0, 1]", lambda v: 0 < v <= 1)
        _require_number(
            "reconstruction_weight", self.reconstruction_weight, "a finite number >= 0",
            lambda v: v >= 0,
        )  # fmt: skip
        for name in ("download", "amp", "compile", "progress", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        for name in ("device", "out_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(name, f"must be a non-empty string, got {value!r}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise ConfigError("data_dir", f"must be a path or None, got {self.data_dir!r}")
        for name in ("dataset", "architecture", "routing", "eval_mask"):
            allowed = _SETTINGS[name].allowed()
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        spec = get_dataset(self.dataset)
        problem = spec.image_shape_problem(self.model.input_shape)
        if problem is not None:
            raise ConfigError("model.input_shape", problem)
        if self.model.num_classes != spec.num_classes:
            raise ConfigError(
                "model.num_classes",
                f"must be {spec.num_classes} for {spec.name} ({spec.num_classes} classes), "
                f"got {self.model.num_classes}",
            )
        problem = spec.max_shift_problem(self.model.input_shape, self.effective_max_shift)
        if problem is not None:
            raise ConfigError("max_shift", problem)
        if self.architecture == "cnn-baseline":
            self._check_cnn_baseline(spec)

    def _check_cnn_baseline(self, spec) -> None:
        if spec.labels_per_example != 1:
            raise ConfigError(
                "architecture",
                f"cnn-baseline classifies one digit per image; {spec.name} has "
                f"{spec.labels_per_example} per example (train capsnet on it)",
            )
        defaults = CapsNetConfig()
        for f in dataclasses.fields(CapsNetConfig):
            value = getattr(self.model, f.name)
            if f.name not in CNN_MODEL_FIELDS and value != getattr(defaults, f.name):
                raise ConfigError(
                    f"model.{f.name}",
                    f"is a CapsNet setting and does not apply to cnn-baseline (got {value!r})",
                )

    @property
    def effective_max_shift(self) -> int:
        """The training shift in pixels: ``max_shift``, or the data set's default."""
        if self.max_shift is not None:
            return self.max_shift
        return get_dataset(self.dataset).default_max_shift

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only, safe for JSON and ``torch.load(weights_only=True)``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["model"] = self.model.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; a field this version does not know is an error."""
        if not isinstance(values, dict):
            raise ConfigError("train_config", f"must be a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(name) for name in set(values) - known)
        if unknown:
            raise ConfigError(
                unknown[0],
                f"is not a TrainConfig field (unknown: {unknown}; known: {sorted(known)})",
            )
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def trajectory_differences(self, other: TrainConfig) -> list[str]:
        """Names of the trajectory fields where ``other`` differs (``model.*`` for the
        network's fields, all of which decide the weights)."""
        different = [
            name for name in TRAJECTORY_FIELDS if getattr(self, name) != getattr(other, name)
        ]
        for f in dataclasses.fields(self.model):
            if getattr(self.model, f.name) != getattr(other.model, f.name):
                different.append(f"model.{f.name}")
        return different

    def lookup(self, name: str) -> Any:
        """A field by name, ``"model.x"`` for the network's fields."""
        if name.startswith("model."):
            return getattr(self.model, name.removeprefix("model."))
        return getattr(self, name)


_SETTINGS: dict[str, Setting] = {
    f.name: f.metadata["setting"] for f in dataclasses.fields(TrainConfig) if "setting" in f.metadata
}
# Fields that decide the weights a run produces; a resumed run must keep them.
TRAJECTORY_FIELDS = tuple(name for name, s in _SETTINGS.items() if s.trajectory)


def config_settings() -> dict[str, Setting]:
    """Every option's Setting, keyed by field path (``"lr"``, ``"model.input_shape"``)."""
    return {**_SETTINGS, **{f"model.{name}": s for name, s in MODEL_SETTINGS.items()}}


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an int >= {minimum}, got {value!r}")


def _require_number(name: str, value: object, expected: str, accept) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not accept(value)
    ):
        raise ConfigError(name, f"must be {expected}, got {value!r}")
