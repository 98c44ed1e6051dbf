"""The three CapsNet layers after Conv1: PrimaryCaps, DigitCaps and the reconstruction decoder.

Paper references are to Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules"
(NeurIPS 2017). Capsule tensors are ``[B, N, D]``: batch, capsule index, capsule component.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capsnet.functional import squash
from capsnet.routing_layer import DynamicRouting

DECODER_INPUTS = ("masked", "target")


def conv_output_size(size: int, kernel_size: int, stride: int) -> int:
    """Spatial size after an unpadded ("valid") convolution."""
    return (size - kernel_size) // stride + 1


class PrimaryCaps(nn.Module):
    """Convolutional capsules: one convolution, regrouped into capsules and squashed (Sec. 4).

    The paper's PrimaryCapsules layer has 32 "channels" (capsule types) of 8-D convolutional
    capsules, 9x9 kernels, stride 2; on a 20x20 Conv1 output this gives a 6x6 grid, i.e.
    32 * 6 * 6 = 1152 capsules. It is a single ``Conv2d(256, 32 * 8)``; its output channel
    ``type * capsule_dim + k`` is component ``k`` of capsule type ``type``.

    Capsule order follows the official code (``capsule_model.py`` in Sarasra/models,
    research/capsules): output capsule index ``type * H * W + row * W + col``, and the
    components of one capsule are the ``capsule_dim`` channels of its type *at one pixel*
    (not neighbouring pixels of one channel, a common bug when the conv output is reshaped
    without the permute).
    """

    def __init__(
        self,
        in_channels: int = 256,
        num_types: int = 32,
        capsule_dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_types", num_types),
            ("capsule_dim", capsule_dim),
            ("kernel_size", kernel_size),
            ("stride", stride),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_types = num_types
        self.capsule_dim = capsule_dim
        self.kernel_size = kernel_size
        self.stride = stride
        self.conv = nn.Conv2d(in_channels, num_types * capsule_dim, kernel_size, stride=stride)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The capsule grid ``(rows, cols)`` for an input feature map of ``height x width``."""
        return (
            conv_output_size(height, self.kernel_size, self.stride),
            conv_output_size(width, self.kernel_size, self.stride),
        )

    def num_capsules(self, height: int, width: int) -> int:
        """Number of output capsules for an input feature map of ``height x width``."""
        rows, cols = self.grid_size(height, width)
        return self.num_types * rows * cols

    def forward(self, features: Tensor) -> Tensor:
        """``features [B, in_channels, H, W]`` -> squashed capsules ``[B, types*rows*cols, D]``."""
        out = self.conv(features)
        batch, _, rows, cols = out.shape
        # [B, types * D, rows, cols] -> [B, types, D, rows, cols] -> [B, types, rows, cols, D]:
        # the component axis moves last so that one capsule = D channels at one pixel.
        capsules = out.view(batch, self.num_types, self.capsule_dim, rows, cols)
        capsules = capsules.permute(0, 1, 3, 4, 2).reshape(batch, -1, self.capsule_dim)
        return squash(capsules, dim=-1)  # Eq. 1, safe at zero


class DigitCaps(DynamicRouting):
    """CapsNet's routing layer (Sec. 4): :class:`capsnet.DynamicRouting` from the primary
    capsules to one capsule per class, with the initialisation CapsNet was trained with.

    Parameters ``weight [N_in, N_out, D_out, D_in]`` and optional ``bias [N_out, D_out]``,
    as in earlier versions, so existing checkpoints load unchanged.

    Initialisation: ``W ~ Normal(0, weight_std)`` with ``weight_std = 0.01`` by default, the
    scale used by widely used re-implementations of the paper (the paper gives none). On
    MNIST the untrained network's class lengths are then about 3e-4, far below the margin
    ``m- = 0.1``, so the absent-class term of the loss starts at zero; with Adam at 1e-3 it
    reaches 98.7% test accuracy after one epoch (docs/TRAINING.md). Other scales were not
    compared. The optional output-capsule bias (the official code has one) starts at zero,
    so switching it on does not change the initial network.

    Under ``torch.autocast`` the routing runs in float32 (the op's autocast policy,
    ``capsnet/autocast.py``) and returns float32.
    """

    def __init__(
        self,
        num_in: int,
        dim_in: int,
        num_out: int,
        dim_out: int,
        num_iterations: int = 3,
        backend: str = "auto",
        bias: bool = False,
        weight_std: float = 0.01,
    ) -> None:
        super().__init__(
            num_in, dim_in, num_out, dim_out, num_iterations, bias=bias, backend=backend, weight_std=weight_std
        )

    def extra_repr(self) -> str:
        num_in, num_out, dim_out, dim_in = self.weight.shape
        return (
            f"{num_in}x{dim_in}D -> {num_out}x{dim_out}D, num_iterations={self.num_iterations}, "
            f"backend={self.backend!r}, bias={self.bias is not None}, weight_std={self.weight_std:.4g}"
        )


class ReconstructionDecoder(nn.Module):
    """Reconstructs the input image from the DigitCaps output (Sec. 4.1, Fig. 2).

    Three fully connected layers, 512 -> 1024 -> pixels, with ReLU, ReLU and sigmoid.
    Only one digit capsule reaches the decoder (the "mask"). Two ways to feed it:

    * ``"masked"`` (the paper and the official code): all ``num_classes * capsule_dim``
      components, with every capsule but the selected one set to zero, so the first layer
      has separate weights per class.
    * ``"target"``: only the selected capsule's ``capsule_dim`` components, so the first layer
      is shared by all classes (73,728 fewer parameters for MNIST).
    """

    def __init__(
        self,
        num_classes: int = 10,
        capsule_dim: int = 16,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        hidden_sizes: tuple[int, ...] = (512, 1024),
        decoder_input: str = "masked",
    ) -> None:
        super().__init__()
        if decoder_input not in DECODER_INPUTS:
            raise ValueError(
                f"decoder_input must be one of {DECODER_INPUTS}, got {decoder_input!r}"
            )
        self.num_classes = num_classes
        self.decoder_input = decoder_input
        self.image_shape = tuple(image_shape)
        num_pixels = 1
        for size in self.image_shape:
            num_pixels *= size
        in_features = num_classes * capsule_dim if decoder_input == "masked" else capsule_dim
        layers: list[nn.Module] = []
        for hidden in hidden_sizes:
            layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
            in_features = hidden
        layers += [nn.Linear(in_features, num_pixels), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, digit_caps: Tensor, selected: Tensor) -> Tensor:
        """``digit_caps [B, classes, D]`` and the class to reconstruct per sample ``[B]``
        -> images ``[B, *image_shape]`` in [0, 1]."""
        if self.decoder_input == "masked":
            # One-hot by comparison: F.one_hot would wait for the GPU to check the range.
            classes = torch.arange(self.num_classes, device=digit_caps.device)
            mask = (selected.unsqueeze(1) == classes).to(digit_caps.dtype)
            decoder_in = (digit_caps * mask.unsqueeze(-1)).flatten(1)
        else:
            batch_index = torch.arange(digit_caps.shape[0], device=digit_caps.device)
            decoder_in = digit_caps[batch_index, selected]
        return self.net(decoder_in).view(-1, *self.image_shape)
