"""Training CapsNet on MNIST: the library behind ``train_mnist.py`` (see docs/TRAINING.md).

Modules, one job each:

    config        TrainConfig: the run's settings, saved in every checkpoint
    runner        fit() and evaluate_checkpoint(): a whole run, resume, outputs
    loop          one training epoch (resumable at any step) and one evaluation pass
    checkpoint    atomic save, weights_only load, model_from_checkpoint()
    distributed   torchrun / DistributedDataParallel set-up and the collectives used
    interrupt     Ctrl-C / SIGTERM as "stop after this step and save"
    metrics       running loss/accuracy sums and the per-epoch CSV log
    plots         reconstruction and learning-curve PNGs
    precision     mixed-precision dtype, autocast and loss scaling
    rng_state     saving and restoring the global random generators
    atomic_io     write-to-temporary-then-rename for every output file

Training needs ``torchvision`` (reading MNIST), ``tqdm`` and ``matplotlib``, which the
routing op itself does not.
"""

from capsnet.training.checkpoint import load_checkpoint, model_from_checkpoint
from capsnet.training.config import TrainConfig
from capsnet.training.runner import FitResult, TrainingInterrupted, evaluate_checkpoint, fit

__all__ = [
    "FitResult",
    "TrainConfig",
    "TrainingInterrupted",
    "evaluate_checkpoint",
    "fit",
    "load_checkpoint",
    "model_from_checkpoint",
]
