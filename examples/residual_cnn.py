"""An ordinary user-written network, outside the bpfree package: a small residual CNN with batch norm.

    bpfree train --model examples/residual_cnn.py:ResidualCNN --method dfa --data cifar10 --epochs 5

bpfree calls the class with `num_classes` and `input_shape` and finds its layers and blocks itself
(the stem, then each residual stage, in the order `forward` calls them).
"""

from __future__ import annotations

import torch
from torch import nn


class Stage(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or strided 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResidualCNN(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.stage1 = Stage(width, width, 1)
        self.stage2 = Stage(width, 2 * width, 2)
        self.stage3 = Stage(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, classes]
        h = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(h.mean((2, 3)))
