"""Building the network a run trains and its objective, from the run's settings.

``TrainConfig.architecture`` (``--model``) picks the entry of :data:`ARCHITECTURE_BUILDERS`;
another network plugs in by adding its builder and objective there. The objective may also
depend on the data set: CapsNet on images with several digits (MultiMNIST) is trained and
scored as Sec. 6 says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from capsnet import _extension
from capsnet.baselines import BaselineCNN
from capsnet.datasets import get_dataset
from capsnet.model import CapsNet
from capsnet.training.config import TrainConfig
from capsnet.training.errors import RoutingBackendUnavailableError
from capsnet.training.objective import (
    CapsNetObjective,
    CrossEntropyObjective,
    MultiDigitCapsNetObjective,
)


@dataclass(frozen=True)
class Architecture:
    """How to build a network and its objective; ``routes``: it runs the routing op (so
    ``--routing`` applies to it)."""

    build: Callable[[TrainConfig], nn.Module]
    objective: Callable[[TrainConfig], Callable]
    routes: bool


def _build_capsnet(config: TrainConfig) -> nn.Module:
    return CapsNet(config.model, routing_backend=config.routing)


def _capsnet_objective(config: TrainConfig):
    if get_dataset(config.dataset).labels_per_example > 1:
        return MultiDigitCapsNetObjective(config.reconstruction_weight)
    return CapsNetObjective(config.reconstruction_weight)


def _build_cnn_baseline(config: TrainConfig) -> nn.Module:
    return BaselineCNN(config.model.input_shape, config.model.num_classes)


ARCHITECTURE_BUILDERS = {
    "capsnet": Architecture(build=_build_capsnet, objective=_capsnet_objective, routes=True),
    "cnn-baseline": Architecture(
        build=_build_cnn_baseline,
        objective=lambda config: CrossEntropyObjective(),
        routes=False,
    ),
}


def build_model(config: TrainConfig) -> nn.Module:
    """The untrained network ``config`` describes (on the CPU, from the global generator)."""
    return ARCHITECTURE_BUILDERS[config.architecture].build(config)


def build_objective(config: TrainConfig):
    return ARCHITECTURE_BUILDERS[config.architecture].objective(config)


def uses_routing(config: TrainConfig) -> bool:
    return ARCHITECTURE_BUILDERS[config.architecture].routes


def check_routing_backend(config: TrainConfig, device: torch.device) -> None:
    """Fail before any work if the fused kernel asked for does not exist on ``device``
    (for networks that route)."""
    routing = config.routing
    if routing != "fused" or not uses_routing(config):
        return
    try:
        _extension.require_kernel(device.type, torch.float32)
    except RuntimeError:
        reason = _extension.missing_reason(device.type, torch.float32)
        raise RoutingBackendUnavailableError(
            f"--routing fused needs the compiled routing kernel for {device.type}: {reason}. "
            "Build it, or train with --routing reference (same results, much slower)."
        ) from None
