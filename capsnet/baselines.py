"""The paper's baseline CNN (Sabour, Frosst & Hinton, 2017, Sec. 5).

Sec. 5: "The baseline is a standard CNN with three convolutional layers of 256, 256, 128
channels. Each has 5x5 kernels and stride of 1. The last convolutional layers are followed
by two fully connected layers of size 328, 192. The last fully connected layer is connected
with dropout to a 10 class softmax layer with cross entropy loss." It has 35.4M parameters
on MNIST (Sec. 5) and is the network CapsNet is compared with on affNIST (Sec. 5.2).

    image [B, 1, 28, 28]
      -> 3 x (Conv 5x5, stride 1, "same" zero padding, ReLU): 256, 256, 128 channels
                                                              [B, 128, 28, 28]
      -> FC 328, ReLU -> FC 192, ReLU -> dropout -> FC 10     [B, 10] logits

The paper gives no pooling and no padding; 35.4M parameters pin them down: with "same"
padding and no pooling the first fully connected layer sees 128 * 28 * 28 = 100,352
features, and the network has 35,445,522 parameters (32,915,784 in that layer), the
paper's 35.4M. Pooling, or unpadded convolutions on 28x28, would give a few million.

Other input sizes keep the 28x28 feature grid where equal padding of the three layers can
(``padding = (40 - size) / 6`` pixels: 2 for 28x28, 1 for 34x34, 0 for 40x40), so the
network on 40x40 expanded MNIST (Sec. 5.2) has the same 35,445,522 parameters; any other
size uses "same" padding and its fully connected layer grows with the image area.
The dropout rate is not given in the paper; 0.5 is used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CONV_CHANNELS = (256, 256, 128)
KERNEL_SIZE = 5
HIDDEN_SIZES = (328, 192)
FEATURE_GRID = 28  # the feature maps' size on MNIST: "same" convolutions on 28x28
DROPOUT = 0.5


def conv_padding(size: int) -> int:
    """Zero padding of each convolution for an input side of ``size`` pixels: the one
    giving 28x28 feature maps when there is such a padding from 0 to 2 ("same"),
    otherwise "same" (2)."""
    shrink = len(CONV_CHANNELS) * (KERNEL_SIZE - 1)  # 12: three unpadded 5x5 layers
    padding, remainder = divmod(FEATURE_GRID - size + shrink, 2 * len(CONV_CHANNELS))
    if remainder == 0 and 0 <= padding <= KERNEL_SIZE // 2:
        return padding
    return KERNEL_SIZE // 2


class BaselineCNN(nn.Module):
    """The baseline CNN of Sec. 5; ``forward`` returns class logits ``[B, num_classes]``.

    Args:
        input_shape: ``(channels, height, width)`` of the images.
        num_classes: outputs of the softmax layer.
        dropout: dropout rate before the last layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        dropout: float = DROPOUT,
    ) -> None:
        super().__init__()
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in input_shape):
            raise ValueError(f"input_shape must be three positive ints, got {input_shape}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.input_shape = input_shape
        channels, height, width = input_shape
        paddings = (conv_padding(height), conv_padding(width))
        layers: list[nn.Module] = []
        for out_channels in CONV_CHANNELS:
            layers += [
                nn.Conv2d(channels, out_channels, KERNEL_SIZE, stride=1, padding=paddings),
                nn.ReLU(inplace=True),
            ]
            channels = out_channels
            height += 2 * paddings[0] - (KERNEL_SIZE - 1)
            width += 2 * paddings[1] - (KERNEL_SIZE - 1)
        if height < 1 or width < 1:
            raise ValueError(f"input_shape {input_shape} is too small for three 5x5 convolutions")
        self.features = nn.Sequential(*layers)
        self.feature_shape = (channels, height, width)
        in_features = channels * height * width
        hidden: list[nn.Module] = []
        for size in HIDDEN_SIZES:
            hidden += [nn.Linear(in_features, size), nn.ReLU(inplace=True)]
            in_features = size
        self.classifier = nn.Sequential(
            *hidden, nn.Dropout(dropout), nn.Linear(in_features, num_classes)
        )

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            expected = "[B, " + ", ".join(map(str, self.input_shape)) + "]"
            raise ValueError(
                f"images must have shape {expected} (the model's input_shape), "
                f"got {tuple(images.shape)}"
            )
        return self.classifier(torch.flatten(self.features(images), 1))
