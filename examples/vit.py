"""A small vision transformer built from `nn.TransformerEncoder` (a user's model: bpfree finds its blocks itself).

    bpfree train --model examples/vit.py:ViT --method l-bp --data cifar10
"""

from __future__ import annotations

import torch
from torch import nn


class ViT(nn.Module):
    """Patch embedding (a strided convolution), a learned position embedding, `depth` pre-norm encoder layers,
    mean-pooled tokens, a linear classifier."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), depth: int = 8,
                 dim: int = 64, heads: int = 4, patch: int = 4):  # fmt: skip
        super().__init__()
        channels, height, width = input_shape
        self.input_shape = tuple(input_shape)
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (height // patch) * (width // patch), dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(h)).mean(1))
