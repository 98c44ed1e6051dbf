"""Building the network a run trains and its objective, from the run's settings.

``TrainConfig.architecture`` (``--model``) picks the entry of :data:`ARCHITECTURE_BUILDERS`;
another network (a CNN baseline) plugs in by adding its builder and objective there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from capsnet import _extension
from capsnet.model import CapsNet
from capsnet.training.config import TrainConfig
from capsnet.training.errors import RoutingBackendUnavailableError
from capsnet.training.objective import CapsNetObjective


@dataclass(frozen=True)
class Architecture:
    build: Callable[[TrainConfig], nn.Module]
    objective: Callable[[TrainConfig], Callable]


def _build_capsnet(config: TrainConfig) -> nn.Module:
    return CapsNet(config.model, routing_backend=config.routing)


ARCHITECTURE_BUILDERS = {
    "capsnet": Architecture(
        build=_build_capsnet,
        objective=lambda config: CapsNetObjective(config.reconstruction_weight),
    ),
}


def build_model(config: TrainConfig) -> nn.Module:
    """The untrained network ``config`` describes (on the CPU, from the global generator)."""
    return ARCHITECTURE_BUILDERS[config.architecture].build(config)


def build_objective(config: TrainConfig):
    return ARCHITECTURE_BUILDERS[config.architecture].objective(config)


def check_routing_backend(routing: str, device: torch.device) -> None:
    """Fail before any work if the fused kernel asked for does not exist on ``device``."""
    if routing != "fused":
        return
    try:
        _extension.require_kernel(device.type, torch.float32)
    except RuntimeError:
        reason = _extension.missing_reason(device.type, torch.float32)
        raise RoutingBackendUnavailableError(
            f"--routing fused needs the compiled routing kernel for {device.type}: {reason}. "
            "Build it, or train with --routing reference (same results, much slower)."
        ) from None
