"""Training CapsNet: the library behind ``train_mnist.py`` (see docs/TRAINING.md).

Modules, one job each:

    config         TrainConfig: the run's settings, with each option's flag and help
    cli            train_mnist.py's parser and docs table, generated from TrainConfig
    trainer        fit(): a whole run (set-up, resume, epochs, outputs)
    state          TrainingState: the run's state and the checkpoint schema (format version)
    checkpoint     reading and writing checkpoint files; model_from_checkpoint()
    run_directory  the output directory: files, write order, crash repair, new-run policy
    loop           one training epoch, resumable at any step
    evaluation     test-set metrics, during a run and of a saved checkpoint
    objective      what a step minimises and counts (CapsNet's margin + reconstruction loss)
    models         building the network a run trains
    data           loading a run's data set splits (the data sets are in capsnet.datasets)
    distributed    torchrun set-up, collectives, the step vote (stop/divergence, no host sync)
    interrupt      Ctrl-C / SIGTERM as "stop after this step and save"
    metrics        running sums, the per-step log, the CSV logs
    plots          training curves and reconstruction PNGs
    logs           logging set-up and TensorBoard event files
    precision      mixed-precision dtype, autocast and loss scaling
    rng_state      saving and restoring the global random generators
    atomic_io      write-to-temporary-then-rename for every output file
    errors         the errors a run reports (setup errors, run failures, interruption)

Training needs the ``train`` extra (numpy, tqdm, matplotlib; torchvision to download
MNIST); TensorBoard event files need the ``tensorboard`` extra.
"""

from capsnet.training.checkpoint import Checkpoint, model_from_checkpoint, read_checkpoint
from capsnet.training.config import TrainConfig
from capsnet.training.errors import (
    CheckpointError,
    ConfigError,
    ResumeError,
    RunFailure,
    SetupError,
    TrainingDiverged,
    TrainingInterrupted,
)
from capsnet.training.evaluation import evaluate_checkpoint
from capsnet.training.state import TrainingState
from capsnet.training.trainer import FitResult, fit

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "FitResult",
    "ResumeError",
    "RunFailure",
    "SetupError",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "TrainingState",
    "evaluate_checkpoint",
    "fit",
    "model_from_checkpoint",
    "read_checkpoint",
]
