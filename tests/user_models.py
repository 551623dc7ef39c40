"""Two networks written as a user would, for the tests and as columns of `bpfree methods --matrix --model
tests/user_models.py:ResidualCNN --model tests/user_models.py:TinyViT`: an ordinary `nn.Module` with residuals and
batch norm, and a small ViT built from `nn.TransformerEncoder`."""

from __future__ import annotations

import torch
from torch import nn


class ResidualCNN(nn.Module):
    """A user's own residual CNN with batch norm: an nn.Module, not an nn.Sequential."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 16, 16)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(self.bn(self.conv(h)) + h)
        h = torch.relu(self.down(h))
        return self.fc(h.mean((2, 3)))


class TinyViT(nn.Module):
    """A small Vision Transformer: 4x4-pixel patches, a positional embedding, `nn.TransformerEncoder`, mean pool."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 16, 16), dim: int = 32):
        super().__init__()
        self.patch = nn.Conv2d(input_shape[0], dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, (input_shape[1] // 4) * (input_shape[2] // 4), dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(t)).mean(1))
