"""torchvision's ResNet-18 with a small-image stem.

The ImageNet stem (7x7 stride-2 conv + max-pool) shrinks a 32x32 image to 8x8 before the first
block and an 8x8 digit to nothing; the usual CIFAR variant swaps it for a 3x3 stride-1 conv and
drops the pool.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models import resnet18


def build_resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    channels = input_shape[0]
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
