#!/usr/bin/env python
"""Train CapsNet (Sabour, Frosst & Hinton, 2017) on MNIST with fused dynamic routing.

Examples:

    # the paper's network and augmentation, 50 epochs (meant for a GPU)
    python train_mnist.py --data-dir ../shared/data

    # a few minutes on 2 CPU cores (~97% test accuracy): 10,000 images, one epoch
    python train_mnist.py --data-dir ../shared/data --limit-train 10000 --batch-size 32 --epochs 1

    # several GPUs (or CPU processes) with DistributedDataParallel
    torchrun --nproc_per_node=4 train_mnist.py --data-dir ../shared/data

    # continue a stopped run; evaluate a checkpoint
    python train_mnist.py --resume runs/mnist/last.pt
    python train_mnist.py --eval runs/mnist/best.pt

    # the paper's other experiments (docs/EXPERIMENTS.md): MultiMNIST (Sec. 6), and
    # expanded MNIST with the affine evaluation and the baseline CNN (Sec. 5.2)
    python train_mnist.py --dataset multimnist --out-dir runs/multimnist
    python train_mnist.py --dataset expanded-mnist --stop-at-accuracy 99.23 --out-dir runs/exp-caps
    python train_mnist.py --dataset expanded-mnist --model cnn-baseline --out-dir runs/exp-cnn
    python train_mnist.py --eval runs/exp-caps/last.pt --eval-set affine

Exit status: 0 done, 1 the run failed after it started (diverged, disk full; the last
checkpoint is intact), 2 it could not start (options, data, output directory, checkpoint),
130 stopped by Ctrl-C/SIGTERM after saving a checkpoint. The options are generated from
``capsnet.training.config.TrainConfig``; see docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from capsnet.datasets import DatasetError
from capsnet.training.checkpoint import read_checkpoint
from capsnet.training.cli import build_parser, config_from_args, option_error
from capsnet.training.errors import ConfigError, RunFailure, SetupError, TrainingInterrupted
from capsnet.training.evaluation import evaluate_saved_run
from capsnet.training.logs import configure_logging
from capsnet.training.run_directory import read_resume_checkpoint
from capsnet.training.trainer import FitResult, describe_metrics, fit

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's code for "stopped by SIGINT"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.eval is not None and args.resume is not None:
        build_parser().error("--eval and --resume cannot be combined")
    if args.eval_set is not None and args.eval is None:
        build_parser().error("--eval-set chooses what --eval evaluates: give --eval CHECKPOINT")
    return args


def run_training(argv: list[str] | None = None) -> FitResult:
    """Parse ``argv`` and train; raises on errors (``main`` turns them into messages)."""
    args = parse_args(argv)
    if args.eval is not None:
        raise ValueError("run_training does not evaluate; use main() or evaluate_checkpoint")
    checkpoint = None
    base = None
    if args.resume is not None:
        checkpoint = read_resume_checkpoint(args.resume)
        base = checkpoint.config
        if "out_dir" not in vars(args):
            args.out_dir = str(Path(args.resume).parent)
    config = config_from_args(args, base)
    return fit(config, resume=checkpoint, overwrite=args.overwrite)


def evaluate(args: argparse.Namespace) -> None:
    checkpoint = read_checkpoint(args.eval)
    config = config_from_args(args, checkpoint.config)
    eval_set = args.eval_set or "test"
    try:
        metrics = evaluate_saved_run(checkpoint, config, eval_set)
    except ConfigError as error:
        if error.field == "eval_set":
            raise ConfigError(error.field, error.reason, option="--eval-set") from None
        raise option_error(error) from None
    print(
        f"{args.eval}: {eval_set} accuracy {100 * metrics['accuracy']:.2f}% "
        f"(error {100 * (1 - metrics['accuracy']):.2f}%), "
        f"{describe_metrics(metrics, accuracy=False)}"
    )


def main(argv: list[str] | None = None) -> int:
    configure_logging(rank=int(os.environ.get("RANK", "0") or 0))
    args = parse_args(argv)
    try:
        if args.eval is not None:
            evaluate(args)
            return 0
        result = run_training(argv)
    except TrainingInterrupted as stopped:
        if stopped.checkpoint_path is not None:  # rank 0 saved; other ranks stay quiet
            print(f"\n{stopped}", file=sys.stderr)
            print(
                f"continue with: train_mnist.py --resume {stopped.checkpoint_path}", file=sys.stderr
            )
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a second Ctrl-C: the user did not want to wait for the save
        print("\ntrain_mnist.py: interrupted without saving a checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SetupError, DatasetError) as error:
        print(f"train_mnist.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailure as error:
        print(f"train_mnist.py: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if result.best.epoch is not None:
        best = result.history[result.best.epoch - 1]
        print(
            f"done: best test accuracy {100 * best['test_accuracy']:.2f}% at epoch "
            f"{best['epoch']} ({result.out_dir / 'best.pt'}); outputs in {result.out_dir}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
