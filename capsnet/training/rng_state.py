"""Saving and restoring PyTorch's global random number generators.

The training loop itself draws nothing from the global generators: batch order and shifts
come from generators seeded per epoch and per step (``capsnet.datasets.derive_seed``), which
is what makes resuming exact at any step. The global states are still saved in every
checkpoint and restored on resume, so that code added later that does use them (dropout,
``torch.rand`` in a new augmentation) resumes exactly too.
"""

from __future__ import annotations

from typing import Any

import torch


def capture_rng_state() -> dict[str, Any]:
    """The CPU generator state and, when CUDA is initialised, every CUDA device's state."""
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored only when the saved
    run and this one see the same number of CUDA devices (a CPU run ignores them)."""
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
