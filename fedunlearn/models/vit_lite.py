"""A small vision transformer (ViT-Lite: a few pre-norm encoder blocks on image patches)."""

from __future__ import annotations

import torch
import torch.nn as nn


def _patch_size_for(height: int, width: int) -> int:
    # 4x4 patches on 28/32-pixel images, 2x2 on 8x8 digits: always at least 4 patches per side.
    for patch in (4, 2, 1):
        if height % patch == 0 and width % patch == 0 and height // patch >= 4 and width // patch >= 4:
            return patch
    return 1


class ViTLite(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
    ):
        super().__init__()
        channels, height, width = input_shape
        self.patch_size = _patch_size_for(height, width)
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=mlp_ratio * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only matters for padded sequences and warns with norm_first.
        self.encoder = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        encoded = self.norm(self.encoder(tokens))
        return self.head(encoded[:, 0])
