"""CapsNet for MNIST (Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", 2017, Sec. 4).

    image [B, 1, 28, 28]
      -> Conv1: 256 channels, 9x9, stride 1, ReLU           [B, 256, 20, 20]
      -> PrimaryCaps: 32 types of 8-D capsules, 9x9, stride 2, squash
                                                            [B, 1152, 8]
      -> DigitCaps: 10 x 16-D, dynamic routing (3 iterations)
                                                            [B, 10, 16]
      -> class scores = capsule lengths                     [B, 10]
      -> decoder (Sec. 4.1): one digit capsule -> FC 512, 1024, 784 -> image

Routing happens only between PrimaryCaps and DigitCaps (Sec. 4). With the paper's masked
decoder input and no capsule bias the network has 8,215,568 parameters.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from capsnet.layers import (
    DECODER_INPUTS,
    DigitCaps,
    PrimaryCaps,
    ReconstructionDecoder,
    conv_output_size,
)
from capsnet.ops import BACKENDS

MASK_CHOICES = ("auto", "true", "predicted")


class ConfigFieldError(ValueError):
    """A configuration field has a value it cannot take.

    Attributes:
        field: the field's name (``"input_shape"``; nested fields as ``"model.input_shape"``),
            so that a front end can name its own option for it.
        reason: what is wrong, in words, without the field name.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason

    def nested_in(self, prefix: str) -> ConfigFieldError:
        """The same error for this config used as field ``prefix`` of another one."""
        return ConfigFieldError(f"{prefix}.{self.field}", self.reason)


@dataclass(frozen=True)
class CapsNetConfig:
    """Everything that defines a CapsNet's architecture; defaults are the paper's MNIST network.

    How the network is executed (routing backend, device, dtype) is not part of it: the same
    weights run with any of them. Pass the routing backend to :class:`CapsNet`.

    Attributes:
        input_shape: ``(channels, height, width)`` of the images, e.g. ``(1, 36, 36)`` for
            MultiMNIST (Sec. 6: a 10x10 PrimaryCaps grid) or ``(1, 40, 40)`` for expanded
            MNIST and affNIST (Sec. 5.2: 12x12).
        num_classes: number of digit capsules.
        conv1_channels, conv1_kernel: Conv1 (Sec. 4: 256 channels, 9x9, stride 1).
        primary_types, primary_dim, primary_kernel, primary_stride: PrimaryCaps (Sec. 4:
            32 types of 8-D capsules, 9x9, stride 2).
        digit_dim: dimension of each digit capsule (Sec. 4: 16).
        routing_iterations: routing iterations (Sec. 4 and Table 1: 3).
        capsule_bias: learn a bias on each digit capsule's total input (the official code has
            one; the paper does not mention it).
        weight_init_std: standard deviation of the normal init of the routing weights ``W``.
        reconstruction: build the decoder and return reconstructions (Sec. 4.1).
        decoder_input: ``"masked"`` (the paper: all capsules, all but one zeroed) or
            ``"target"`` (only the selected capsule's components).
        decoder_hidden: sizes of the decoder's hidden layers (Fig. 2: 512, 1024).

    Raises:
        ConfigFieldError: naming the field, for any value the network cannot be built with.
    """

    input_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    conv1_channels: int = 256
    conv1_kernel: int = 9
    primary_types: int = 32
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    digit_dim: int = 16
    routing_iterations: int = 3
    capsule_bias: bool = False
    weight_init_std: float = 0.01
    reconstruction: bool = True
    decoder_input: str = "masked"
    decoder_hidden: tuple[int, ...] = (512, 1024)

    def __post_init__(self) -> None:
        # Lists arrive from JSON or checkpoints; keep the frozen config hashable.
        for name in ("input_shape", "decoder_hidden"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)):
                raise ConfigFieldError(name, f"must be a tuple of ints, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if len(self.input_shape) != 3 or not all(_is_positive_int(s) for s in self.input_shape):
            raise ConfigFieldError(
                "input_shape",
                f"must be three positive ints (channels, height, width), got {self.input_shape}",
            )
        for name in (
            "num_classes",
            "conv1_channels",
            "conv1_kernel",
            "primary_types",
            "primary_dim",
            "primary_kernel",
            "primary_stride",
            "digit_dim",
            "routing_iterations",
        ):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ConfigFieldError(name, f"must be a positive int, got {value!r}")
        if not all(_is_positive_int(s) for s in self.decoder_hidden):
            raise ConfigFieldError(
                "decoder_hidden", f"must be positive ints, got {self.decoder_hidden}"
            )
        for name in ("capsule_bias", "reconstruction"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigFieldError(name, f"must be a bool, got {getattr(self, name)!r}")
        if self.decoder_input not in DECODER_INPUTS:
            raise ConfigFieldError(
                "decoder_input", f"must be one of {DECODER_INPUTS}, got {self.decoder_input!r}"
            )
        std = self.weight_init_std
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < math.inf:
            raise ConfigFieldError(
                "weight_init_std", f"must be a positive finite number, got {std!r}"
            )
        rows, cols = self.primary_grid
        if rows < 1 or cols < 1:
            raise ConfigFieldError(
                "input_shape",
                f"{self.input_shape} is too small: Conv1 "
                f"({self.conv1_kernel}x{self.conv1_kernel}) and PrimaryCaps "
                f"({self.primary_kernel}x{self.primary_kernel}, stride {self.primary_stride}) "
                f"leave a {rows}x{cols} capsule grid",
            )

    @property
    def primary_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of the PrimaryCaps grid (6x6 for 28x28 MNIST)."""
        _, height, width = self.input_shape
        conv1_h = conv_output_size(height, self.conv1_kernel, 1)
        conv1_w = conv_output_size(width, self.conv1_kernel, 1)
        return (
            conv_output_size(conv1_h, self.primary_kernel, self.primary_stride),
            conv_output_size(conv1_w, self.primary_kernel, self.primary_stride),
        )

    @property
    def num_primary_capsules(self) -> int:
        """Number of PrimaryCaps capsules (1152 = 32 * 6 * 6 for 28x28 MNIST)."""
        rows, cols = self.primary_grid
        return self.primary_types * rows * cols

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (lists for tuples): safe for JSON and ``weights_only`` loads."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CapsNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from another version?) are an error."""
        if not isinstance(values, dict):
            raise ConfigFieldError(
                "CapsNetConfig", f"must be a dict of fields, got {type(values).__name__}"
            )
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigFieldError(
                str(unknown[0]),
                f"is not a CapsNetConfig field (unknown fields {unknown}; known fields are "
                f"{sorted(known)})",
            )
        return cls(**values)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class CapsNetOutput(NamedTuple):
    """What :class:`CapsNet` returns.

    Attributes:
        digit_caps: DigitCaps output ``v``, ``[B, num_classes, digit_dim]``.
        lengths: capsule lengths ``|v|``, the class scores in [0, 1) (Sec. 2), ``[B, num_classes]``.
        reconstructions: decoder output ``[B, *input_shape]`` in [0, 1], or None when the model
            has no decoder.
        reconstructed_class: the class whose capsule the decoder saw, ``[B]``, or None.
    """

    digit_caps: Tensor
    lengths: Tensor
    reconstructions: Tensor | None
    reconstructed_class: Tensor | None

    @property
    def predictions(self) -> Tensor:
        """Predicted class per sample: the longest digit capsule."""
        return self.lengths.argmax(dim=1)


class CapsNet(nn.Module):
    """The paper's three-layer CapsNet with its reconstruction decoder (Sec. 4, Fig. 1 and 2).

    Example::

        model = CapsNet(CapsNetConfig(), routing_backend="fused")
        out = model(images, labels)          # training: decoder sees the true class
        loss = capsnet_loss(out, images, labels)

    Args:
        config: the architecture (the paper's MNIST network by default).
        routing_backend: how DigitCaps routes: ``"auto"``, ``"fused"`` or ``"reference"``
            (see :func:`capsnet.dynamic_routing`). An execution choice, not part of the
            architecture: it can be changed on a built model (:attr:`routing_backend`).
    """

    def __init__(
        self, config: CapsNetConfig | None = None, *, routing_backend: str = "auto"
    ) -> None:
        super().__init__()
        _check_backend(routing_backend)
        self.config = config = config if config is not None else CapsNetConfig()
        channels = config.input_shape[0]
        self.conv1 = nn.Conv2d(channels, config.conv1_channels, config.conv1_kernel, stride=1)
        self.primary_caps = PrimaryCaps(
            in_channels=config.conv1_channels,
            num_types=config.primary_types,
            capsule_dim=config.primary_dim,
            kernel_size=config.primary_kernel,
            stride=config.primary_stride,
        )
        self.digit_caps = DigitCaps(
            num_in=config.num_primary_capsules,
            dim_in=config.primary_dim,
            num_out=config.num_classes,
            dim_out=config.digit_dim,
            num_iterations=config.routing_iterations,
            backend=routing_backend,
            bias=config.capsule_bias,
            weight_std=config.weight_init_std,
        )
        self.decoder = (
            ReconstructionDecoder(
                num_classes=config.num_classes,
                capsule_dim=config.digit_dim,
                image_shape=config.input_shape,
                hidden_sizes=config.decoder_hidden,
                decoder_input=config.decoder_input,
            )
            if config.reconstruction
            else None
        )

    @property
    def routing_backend(self) -> str:
        return self.digit_caps.backend

    @routing_backend.setter
    def routing_backend(self, backend: str) -> None:
        """Switch the routing backend of a built model (the weights do not depend on it)."""
        _check_backend(backend)
        self.digit_caps.backend = backend

    def forward(
        self, images: Tensor, labels: Tensor | None = None, *, mask: str = "auto"
    ) -> CapsNetOutput:
        """Classify ``images [B, *input_shape]`` and reconstruct one digit capsule per sample.

        Args:
            images: pixel intensities in [0, 1].
            labels: true classes ``[B]`` (int64). Required when the decoder is masked with
                the true class.
            mask: which capsule the decoder sees. ``"true"``: the labelled class (Sec. 4.1,
                used in training); ``"predicted"``: the longest capsule (how the paper
                reconstructs at test time); ``"auto"``: true in training mode, predicted in
                eval mode.
        """
        self._check_images(images)
        if mask not in MASK_CHOICES:
            raise ValueError(f"mask must be one of {MASK_CHOICES}, got {mask!r}")
        if labels is not None:
            self._check_labels(labels, images)

        features = torch.relu(self.conv1(images))
        primary = self.primary_caps(features)
        digit_caps = self.digit_caps(primary)
        lengths = digit_caps.norm(dim=-1)

        if self.decoder is None:
            return CapsNetOutput(digit_caps, lengths, None, None)
        use_true = mask == "true" or (mask == "auto" and self.training)
        if use_true:
            if labels is None:
                raise ValueError(
                    "labels is required to mask the decoder with the true class "
                    f"(mask={mask!r}, training={self.training}); pass labels, or mask='predicted'"
                )
            selected = labels
        else:
            selected = lengths.argmax(dim=1)
        reconstructions = self.decoder(digit_caps, selected)
        return CapsNetOutput(digit_caps, lengths, reconstructions, selected)

    def _check_images(self, images: Tensor) -> None:
        expected = "[B, " + ", ".join(map(str, self.config.input_shape)) + "]"
        if not isinstance(images, Tensor):
            raise TypeError(
                f"images must be a torch.Tensor {expected}, got {type(images).__name__}"
            )
        if images.dim() != 4 or tuple(images.shape[1:]) != self.config.input_shape:
            raise ValueError(
                f"images must have shape {expected} (the model's input_shape), "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")

    def _check_labels(self, labels: Tensor, images: Tensor) -> None:
        if (
            not isinstance(labels, Tensor)
            or labels.dim() != 1
            or labels.shape[0] != images.shape[0]
        ):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(
                f"labels must be a 1-D tensor of {images.shape[0]} class indices, got {shape}"
            )
        if labels.dtype != torch.long:
            raise TypeError(
                f"labels must be int64 (torch.long) class indices, got dtype {labels.dtype}"
            )
        # The range check reads the labels' values: on a GPU that waits for the device at
        # every step, and under torch.compile it would split the graph. The training program
        # checks the labels once, when it loads the data set.
        if labels.device.type != "cpu" or torch.compiler.is_compiling() or not labels.numel():
            return
        num_classes = self.config.num_classes
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must be class indices in [0, {num_classes}), got values from "
                f"{low} to {high}"
            )


def _check_backend(backend: object) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"routing_backend must be one of {BACKENDS}, got {backend!r}")
