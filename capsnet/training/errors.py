"""The errors a training run reports, in two families.

:class:`SetupError`: the run cannot start as asked (bad option, missing or damaged data,
unusable output directory, unreadable or incompatible checkpoint). Nothing was trained;
``train_mnist.py`` prints the message and exits with status 2.

:class:`RunFailure`: the run started and had to stop (the loss diverged, the disk is full).
The last checkpoint written stays intact; ``train_mnist.py`` exits with status 1.

:class:`TrainingInterrupted` (Ctrl-C, SIGTERM) is neither: a checkpoint was saved on request.
"""

from __future__ import annotations

from pathlib import Path

from capsnet.model import ConfigFieldError


class SetupError(Exception):
    """The run cannot start as asked (the message says what and where)."""


class ConfigError(SetupError, ValueError):
    """An option value the run cannot use.

    Attributes:
        field: the TrainConfig field (``"lr"``, ``"model.input_shape"``).
        reason: what is wrong, without the field name.
        option: the command-line option for the field, when the error is about one
            (the message then names it instead of the field).
    """

    def __init__(self, field: str, reason: str, option: str | None = None) -> None:
        super().__init__(f"{option}: {reason}" if option else f"{field} {reason}")
        self.field = field
        self.reason = reason
        self.option = option

    @classmethod
    def from_field_error(cls, error: ConfigFieldError, prefix: str = "") -> ConfigError:
        field = f"{prefix}.{error.field}" if prefix else error.field
        return cls(field, error.reason)


class CheckpointError(SetupError, ValueError):
    """A checkpoint file is missing, unreadable, or not a usable capsnet training checkpoint."""


class ResumeError(SetupError, ValueError):
    """A checkpoint cannot continue the requested run (the message says why)."""


class OutputDirError(SetupError, ValueError):
    """The output directory cannot be used (a file, not writable, ...)."""


class OutputDirInUseError(OutputDirError, FileExistsError):
    """The output directory holds another run's files, which a new run would mix with."""


class DeviceError(SetupError, ValueError):
    """The requested device does not exist here or is not supported (the message says which)."""


class RoutingBackendUnavailableError(SetupError, RuntimeError):
    """The fused routing kernel was asked for where no compiled kernel exists."""


class RunFailure(RuntimeError):
    """The run stopped on an error after it started; the last checkpoint written is intact."""


class TrainingDiverged(RunFailure):
    """A loss or a parameter became NaN or infinite; nothing non-finite was saved."""


class OutputWriteError(RunFailure, OSError):
    """A file could not be written (disk full, quota, I/O error); its previous version is intact.

    Attributes:
        path: the file that was being written.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"could not write {path}: {reason}; its previous version is intact")
        self.path = path


class TrainingInterrupted(Exception):
    """The run stopped early on request (Ctrl-C, SIGTERM) after saving ``checkpoint_path``."""

    def __init__(self, checkpoint_path: Path | None, position) -> None:
        where = (
            f"saved {checkpoint_path}" if checkpoint_path else "no checkpoint written on this rank"
        )
        super().__init__(
            f"training stopped in epoch {position.epoch + 1} after step "
            f"{position.batch_in_epoch} of that epoch (global step {position.global_step}); "
            f"{where}"
        )
        self.checkpoint_path = checkpoint_path
        self.position = position
