"""Two conv + two linear layers: the HF-KCU paper's "SimpleCNN" shape, sized to the input.

``simple-cnn``: conv(32) - pool - conv(64) - pool - fc(128) - fc; on 28x28 images fc1 reads
64 x 7 x 7 = 3136 features.

``simple-cnn-wide`` (:func:`build_simple_cnn_wide`): the same layers with half the channels and no
pooling, conv(16) - conv(32) - fc(128) - fc, so fc1 reads every pixel of the last feature map:
32 x 28 x 28 = 25088 features on 28x28 images, the input width of VGG-11's first FC layer on
ImageNet-size inputs (512 x 7 x 7) that the TensorUnlearn poster's MPO targets. Its KFAC factor A has
dimension 25089 (the bias's trailing 1 included), 2.5 GB in float32. It costs about as much compute
per example as ``simple-cnn`` (its conv2 runs on a 4x larger map with 1/4 of the channel pairs), but
has 3.2 M parameters instead of 0.42 M (fc1 holds 99 % of them).
"""

from __future__ import annotations

import torch
import torch.nn as nn

WIDE_CHANNELS = 16  # conv1's channels in simple-cnn-wide; conv2 has twice as many


class SimpleCNN(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int = 32,
        hidden: int = 128,
        pool: bool = True,
    ):
        super().__init__()
        channels, height, width_px = input_shape
        self.conv1 = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1)
        # Without pooling the feature map keeps the input's size (the "wide" variant).
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        # Two 2x poolings; tiny inputs (8x8 digits) still keep a 2x2 map.
        shrink = 4 if pool else 1
        pooled_h, pooled_w = height // shrink, width_px // shrink
        if pooled_h < 1 or pooled_w < 1:
            raise ValueError(f"simple-cnn needs inputs of at least 4x4 pixels, got {height}x{width_px}")
        self.fc1 = nn.Linear(2 * width * pooled_h * pooled_w, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(start_dim=1)))
        return self.fc2(x)


def build_simple_cnn_wide(input_shape: tuple[int, int, int], num_classes: int) -> SimpleCNN:
    """``simple-cnn-wide``: conv(16) - conv(32) - fc(128) - fc without pooling (fc1 input 32 x H x W)."""
    return SimpleCNN(input_shape, num_classes, width=WIDE_CHANNELS, pool=False)
