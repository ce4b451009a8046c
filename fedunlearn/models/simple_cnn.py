"""Two conv + two linear layers: the HF-KCU paper's "SimpleCNN" shape, sized to the input."""

from __future__ import annotations

import torch
import torch.nn as nn


class SimpleCNN(nn.Module):
    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 32, hidden: int = 128):
        super().__init__()
        channels, height, width_px = input_shape
        self.conv1 = nn.Conv2d(channels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        # Two 2x poolings; tiny inputs (8x8 digits) still keep a 2x2 map.
        pooled_h, pooled_w = height // 4, width_px // 4
        if pooled_h < 1 or pooled_w < 1:
            raise ValueError(f"simple-cnn needs inputs of at least 4x4 pixels, got {height}x{width_px}")
        self.fc1 = nn.Linear(2 * width * pooled_h * pooled_w, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(start_dim=1)))
        return self.fc2(x)
