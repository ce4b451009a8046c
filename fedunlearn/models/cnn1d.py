"""A small 1-D CNN for signals (MNIST-1D): the MNIST-1D paper's conv baseline shape.

Three convolutions (25 channels; kernels 5, 3, 3; stride 2) and a linear classifier: about 5,000
parameters. Each convolution is an ``nn.Conv2d`` with a 1 x k kernel over a height-1 map — the same
function as ``nn.Conv1d`` — because KFAC (fedunlearn/curvature/kfac.py, via curvlinops) covers
Linear and Conv2d layers only: as Conv1d, kfac would treat every conv weight as uncovered.

Images (channels, height, width) are read as a sequence of length height·width in row order, so the
model also runs on the image data sets (as "sequential MNIST" does).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class CNN1D(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 25):
        super().__init__()
        channels, self.length = input_shape[0], math.prod(input_shape[1:])
        self.conv1 = nn.Conv2d(channels, width, kernel_size=(1, 5), stride=(1, 2), padding=(0, 1))
        self.conv2 = nn.Conv2d(width, width, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1))
        self.conv3 = nn.Conv2d(width, width, kernel_size=(1, 3), stride=(1, 2), padding=(0, 1))
        out_length = self.length
        for conv in (self.conv1, self.conv2, self.conv3):
            out_length = (out_length + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        if out_length < 1:
            raise ValueError(f"cnn1d needs signals of at least 7 samples, got {self.length}")
        self.fc = nn.Linear(width * out_length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], x.shape[1], 1, self.length)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(start_dim=1))
