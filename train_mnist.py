#!/usr/bin/env python
"""Train CapsNet (Sabour, Frosst & Hinton, 2017) on MNIST with fused dynamic routing.

Examples:

    # the paper's network and augmentation, 50 epochs (meant for a GPU)
    python train_mnist.py --data-dir ../shared/data

    # about 1.5 minutes on 2 CPU cores (~97% test accuracy): 10,000 images, one epoch
    python train_mnist.py --data-dir ../shared/data --limit-train 10000 --batch-size 32 --epochs 1

    # several GPUs (or CPU processes) with DistributedDataParallel
    torchrun --nproc_per_node=4 train_mnist.py --data-dir ../shared/data

    # continue a stopped run; evaluate a checkpoint
    python train_mnist.py --resume runs/mnist/last.pt
    python train_mnist.py --eval runs/mnist/best.pt

See docs/TRAINING.md for the outputs, resuming, and distributed training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from capsnet.data import DATA_DIR_ENV, DatasetNotFoundError
from capsnet.training.checkpoint import CheckpointError, load_checkpoint
from capsnet.training.config import EVAL_MASKS, TrainConfig
from capsnet.training.distributed import DeviceError
from capsnet.training.runner import (
    FitResult,
    OutputDirInUseError,
    ResumeError,
    RoutingBackendUnavailableError,
    TrainingInterrupted,
    evaluate_checkpoint,
    fit,
)

_DEFAULTS = TrainConfig()
_EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130  # the shell's code for "stopped by SIGINT"

# Command-line option (argparse dest) -> TrainConfig field; "model." for the network.
_OPTION_FIELDS = {
    "data_dir": "data_dir",
    "download": "download",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "eval_batch_size": "eval_batch_size",
    "lr": "lr",
    "lr_decay": "lr_decay",
    "reconstruction_weight": "reconstruction_weight",
    "max_shift": "max_shift",
    "seed": "seed",
    "limit_train": "limit_train",
    "limit_test": "limit_test",
    "amp": "amp",
    "device": "device",
    "out_dir": "out_dir",
    "eval_mask": "eval_mask",
    "progress": "progress",
    "log_every": "log_every",
    "num_reconstructions": "num_reconstructions",
    "routing": "model.routing_backend",
    "routing_iterations": "model.routing_iterations",
    "reconstruction": "model.reconstruction",
    "decoder_input": "model.decoder_input",
    "capsule_bias": "model.capsule_bias",
    "image_size": "model.input_shape",
}


def build_parser() -> argparse.ArgumentParser:
    model = _DEFAULTS.model
    parser = argparse.ArgumentParser(
        description="Train CapsNet on MNIST (Sabour et al., 2017) with fused dynamic routing.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=None,
        help=f"directory holding MNIST/raw (default: ${DATA_DIR_ENV}, else ./data)",
    )
    data.add_argument("--download", action="store_true", help="download MNIST if it is missing")
    data.add_argument(
        "--limit-train",
        type=int,
        default=None,
        metavar="N",
        help="train on the first N images only",
    )
    data.add_argument(
        "--limit-test", type=int, default=None, metavar="N", help="test on the first N images only"
    )
    data.add_argument(
        "--max-shift",
        type=int,
        default=_DEFAULTS.max_shift,
        help="random shift of training images in pixels (Sec. 5)",
    )
    data.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="S",
        help="pad images with zeros to SxS (e.g. 36 as for affNIST, Sec. 5.2); default 28",
    )

    net = parser.add_argument_group("model")
    net.add_argument(
        "--routing",
        choices=("fused", "reference"),
        default=model.routing_backend,
        help="routing implementation: the compiled kernel, or pure PyTorch",
    )
    net.add_argument("--routing-iterations", type=int, default=model.routing_iterations)
    net.add_argument(
        "--decoder-input",
        choices=("masked", "target"),
        default=model.decoder_input,
        help="decoder sees all 10 masked capsules (paper) or the target capsule's 16 components",
    )
    net.add_argument(
        "--no-reconstruction",
        dest="reconstruction",
        action="store_false",
        help="no decoder and no reconstruction loss",
    )
    net.add_argument(
        "--capsule-bias",
        action="store_true",
        help="learned bias on the digit capsules (official code)",
    )

    train = parser.add_argument_group("optimisation")
    train.add_argument("--epochs", type=int, default=_DEFAULTS.epochs)
    train.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="per process")
    train.add_argument("--eval-batch-size", type=int, default=_DEFAULTS.eval_batch_size)
    train.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="Adam learning rate")
    train.add_argument(
        "--lr-decay", type=float, default=_DEFAULTS.lr_decay, help="learning-rate factor per epoch"
    )
    train.add_argument(
        "--reconstruction-weight", type=float, default=_DEFAULTS.reconstruction_weight
    )
    train.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    train.add_argument("--amp", action="store_true", help="mixed precision (routing stays float32)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default=_DEFAULTS.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument(
        "--out-dir",
        default=_DEFAULTS.out_dir,
        help="checkpoints, metrics.csv and plots (with --resume: the checkpoint's directory)",
    )
    run.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier run in --out-dir (refused otherwise)",
    )
    run.add_argument(
        "--eval", metavar="CHECKPOINT", help="only evaluate CHECKPOINT on the test set"
    )
    run.add_argument(
        "--eval-mask",
        choices=EVAL_MASKS,
        default=_DEFAULTS.eval_mask,
        help="class whose capsule the decoder sees at test time",
    )
    run.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars"
    )
    run.add_argument(
        "--log-every", type=int, default=_DEFAULTS.log_every, help="progress-bar refresh in steps"
    )
    run.add_argument("--num-reconstructions", type=int, default=_DEFAULTS.num_reconstructions)
    return parser


_NOT_GIVEN = object()


class UsageError(Exception):
    """Options that do not make a valid run (the message names the option)."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """The parsed options, and the names of those given on the command line."""
    args = build_parser().parse_args(argv)
    probe = build_parser()
    # Parse again with every default replaced by a sentinel: what differs was given.
    probe.set_defaults(**dict.fromkeys(vars(args), _NOT_GIVEN))
    given = {
        name for name, value in vars(probe.parse_args(argv)).items() if value is not _NOT_GIVEN
    }
    return args, given


def _option_value(args: argparse.Namespace, dest: str) -> Any:
    value = getattr(args, dest)
    if dest == "image_size":
        return (1, value, value) if value is not None else _DEFAULTS.model.input_shape
    return value


def build_config(
    args: argparse.Namespace, given: set[str], base: TrainConfig | None = None
) -> TrainConfig:
    """The run's TrainConfig: every option for a new run; for a resumed run, the saved
    config with only the options given on the command line changed."""
    values = (base or _DEFAULTS).to_dict()
    for dest, field in _OPTION_FIELDS.items():
        if base is not None and dest not in given:
            continue
        value = _option_value(args, dest)
        if field.startswith("model."):
            values["model"][field.removeprefix("model.")] = value
        else:
            values[field] = value
    return TrainConfig.from_dict(values)


def run_training(argv: list[str] | None = None) -> FitResult:
    """Parse ``argv`` and train; raises on errors (``main`` turns them into messages)."""
    args, given = parse_args(argv)
    if args.eval is not None:
        raise ValueError("run_training does not evaluate; use main() or evaluate_checkpoint")
    base = None
    if args.resume is not None:
        base = TrainConfig.from_dict(load_checkpoint(args.resume)["train_config"])
        if "out_dir" not in given:
            args.out_dir = str(Path(args.resume).parent)
            given.add("out_dir")
    try:
        config = build_config(args, given, base)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return fit(config, resume=args.resume, overwrite=args.overwrite)


def _evaluate(args: argparse.Namespace, given: set[str]) -> None:
    metrics = evaluate_checkpoint(
        args.eval,
        data_dir=args.data_dir,
        device=args.device,
        routing_backend=args.routing if "routing" in given else None,
        eval_mask=args.eval_mask,
        limit_test=args.limit_test,
        eval_batch_size=args.eval_batch_size,
        amp=args.amp,
        download=args.download,
        progress=args.progress,
    )
    print(
        f"{args.eval}: test accuracy {100 * metrics['accuracy']:.2f}% "
        f"(error {100 * (1 - metrics['accuracy']):.2f}%), "
        f"loss {metrics['loss']:.4f} (margin {metrics['margin_loss']:.4f}, "
        f"reconstruction {metrics['reconstruction_loss']:.4f})"
    )


def main(argv: list[str] | None = None) -> int:
    args, given = parse_args(argv)
    if args.eval is not None and args.resume is not None:
        build_parser().error("--eval and --resume cannot be combined")
    try:
        if args.eval is not None:
            _evaluate(args, given)
            return 0
        result = run_training(argv)
    except TrainingInterrupted as stopped:
        if stopped.checkpoint_path is not None:  # rank 0 saved; other ranks stay quiet
            print(f"\n{stopped}", file=sys.stderr)
            print(
                f"continue with: train_mnist.py --resume {stopped.checkpoint_path}", file=sys.stderr
            )
        return _EXIT_INTERRUPTED
    except (
        UsageError,
        DatasetNotFoundError,
        RoutingBackendUnavailableError,
        ResumeError,
        CheckpointError,
        OutputDirInUseError,
        DeviceError,
    ) as error:
        print(f"train_mnist.py: error: {error}", file=sys.stderr)
        return _EXIT_USAGE
    if result.history:
        best = max(result.history, key=lambda record: record["test_accuracy"])
        print(
            f"done: best test accuracy {100 * best['test_accuracy']:.2f}% "
            f"at epoch {best['epoch']}; "
            f"outputs in {result.out_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
