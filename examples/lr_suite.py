"""Six small model types that bpfree's recipe table has never seen, written as a user would write them: the suite
on which `--lr auto` is measured (benchmarks/lr_auto.py, docs/tuning.md). Each is small enough to train on a CPU in
seconds on digits (8x8) and works on MNIST (28x28) and CIFAR-10 (32x32) too.

    bpfree train --model examples/lr_suite.py:DepthwiseCNN --method dfa --data digits --lr auto

Every class is called with `num_classes` and `input_shape` (C, H, W) and returns logits; the block-wise rules find
the blocks themselves (the top-level submodules, in the order `forward` calls them).
"""

from __future__ import annotations

import torch
from torch import nn


def patch_size(input_shape: tuple[int, ...]) -> int:
    """A patch size giving a 4x4 grid of tokens on 8x8 digits, 7x7 on MNIST, 8x8 on CIFAR-10."""
    return 2 if input_shape[1] <= 8 else 4


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResBNCNN(nn.Module):
    """Convolutional, batch norm and residual shortcuts (a ResNet in miniature)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.stage1 = BasicBlock(width, width, 1)
        self.stage2 = BasicBlock(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


class SeparableBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.pointwise(torch.relu(self.bn1(self.depthwise(x))))))


class DepthwiseCNN(nn.Module):
    """Depthwise-separable convolutions (a MobileNet in miniature)."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 1, 1), nn.ReLU())
        self.block1 = SeparableBlock(width, width, 1)
        self.block2 = SeparableBlock(width, 2 * width, 2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(self.stem(x))).mean((2, 3)))


class PatchEmbed(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], dim: int):
        super().__init__()
        p = patch_size(input_shape)
        self.proj = nn.Conv2d(input_shape[0], dim, p, p)
        tokens = (input_shape[1] // p) * (input_shape[2] // p)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, tokens, dim]
        return self.proj(x).flatten(2).transpose(1, 2) + self.pos


class TinyTransformer(nn.Module):
    """A transformer encoder on image patches (a ViT in miniature), from nn.TransformerEncoderLayer."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], dim: int = 32, depth: int = 2):
        super().__init__()
        self.embed = PatchEmbed(input_shape, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, tokens, dim]
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class TinyMixer(nn.Module):
    """MLP-Mixer-like: token-mixing and channel-mixing MLPs with LayerNorm and residuals."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], dim: int = 32, depth: int = 2):
        super().__init__()
        self.embed = PatchEmbed(input_shape, dim)
        tokens = self.embed.pos.shape[1]
        self.blocks = nn.ModuleList(MixerBlock(tokens, dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


class LayerNormMLP(nn.Module):
    """A fully connected net with LayerNorm after every hidden layer."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 128, depth: int = 2):
        super().__init__()
        sizes = [int(torch.tensor(input_shape).prod())] + [width] * depth
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.LayerNorm(b), nn.ReLU())
                                    for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class Conv1DNet(nn.Module):
    """1-D convolutions over the image read as a sequence of pixels (raster order), channels as features."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 16):
        super().__init__()
        c = input_shape[0]
        self.conv1 = nn.Sequential(nn.Conv1d(c, width, 5, 2, 2), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv1d(width, 2 * width, 5, 2, 2), nn.ReLU())
        self.conv3 = nn.Sequential(nn.Conv1d(2 * width, 2 * width, 5, 2, 2), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(2)  # [B, C, H*W]
        return self.head(self.conv3(self.conv2(self.conv1(h))).mean(2))


SUITE = ("ResBNCNN", "DepthwiseCNN", "TinyTransformer", "TinyMixer", "LayerNormMLP", "Conv1DNet")
