"""MobileNetV3 small / large (Howard et al. 2019) for CIFAR-sized inputs.

Layer table as in the paper. For small images (`cifar=True`, the default) the stem and the first stride-2
bottleneck use stride 1, so a 32x32 input ends at 4x4 instead of 1x1. Exposed as an ordered `blocks`
ModuleList (stem conv, inverted-residual bottlenecks, last 1x1 conv) plus a `head` (pool, linear,
h-swish, dropout, linear), so block-local rules can wrap it. `width` is the paper's width multiplier.
"""

from __future__ import annotations

import torch
from torch import nn

from bpfree.core.registry import Option
from bpfree.models import MODELS
from bpfree.models.resnet import Between, ConvBNAct

# kernel, expansion channels, output channels, squeeze-excite, activation ("RE" ReLU / "HS" h-swish), stride
SMALL = [
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
]
LARGE = [
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
]
# last 1x1 conv channels, hidden units of the classifier
TOPS = {"small": (576, 1024), "large": (960, 1280)}


def divisible(value: float, by: int = 8) -> int:
    """Round channels to a multiple of 8 without dropping more than 10 % (as the reference architecture)."""
    rounded = max(by, int(value + by / 2) // by * by)
    return rounded + by if rounded < 0.9 * value else rounded


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        squeeze = divisible(channels / 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.relu = nn.ReLU()
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    """1x1 expansion -> depthwise kxk (+ squeeze-excite) -> 1x1 projection; residual if shapes match."""

    splittable = True

    def __init__(self, cin: int, kernel: int, expand: int, cout: int, se: bool, act: type, stride: int):
        super().__init__()
        self.expand = ConvBNAct(cin, expand, 1, act=act) if expand != cin else None
        self.depthwise = ConvBNAct(expand, expand, kernel, stride, groups=expand, act=act)
        self.se = SqueezeExcite(expand) if se else nn.Identity()
        self.project = ConvBNAct(expand, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor, between: Between = None) -> torch.Tensor:
        h = x
        if self.expand is not None:
            h = self.expand(h)
            if between is not None:
                h = between(h)
        h = self.se(self.depthwise(h))
        if between is not None:
            h = between(h)
        h = self.project(h)
        return h + x if self.residual else h


class MobileNetV3(nn.Module):
    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        size: str,
        width: float = 1.0,
        cifar: bool = True,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.input_shape = tuple(input_shape)
        table = SMALL if size == "small" else LARGE
        stem = divisible(16 * width)
        blocks: list[nn.Module] = [ConvBNAct(input_shape[0], stem, 3, 1 if cifar else 2, act=nn.Hardswish)]
        cin, reduced = stem, not cifar
        for kernel, expand, cout, se, act, stride in table:
            if stride == 2 and not reduced:
                stride, reduced = 1, True  # keep resolution once more for 32x32 inputs
            expand_c, cout_c = divisible(expand * width), divisible(cout * width)
            block = InvertedResidual(
                cin, kernel, expand_c, cout_c, se, nn.ReLU if act == "RE" else nn.Hardswish, stride
            )
            blocks.append(block)
            cin = cout_c
        last, hidden = TOPS[size]
        last = divisible(last * width)
        blocks.append(ConvBNAct(cin, last, 1, act=nn.Hardswish))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(last, hidden),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _options() -> dict[str, Option]:
    return {
        "width": Option(1.0, "width multiplier (channels scaled and rounded to multiples of 8)", above=0),
        "cifar": Option(True, "small inputs: stem and first stride-2 bottleneck at stride 1"),
        "dropout": Option(0.2, "dropout before the last linear layer", minimum=0, maximum=1),
    }


@MODELS.register(
    "mobilenetv3-small", "MobileNetV3-Small for CIFAR-sized inputs; blocks exposed",
    options=_options(), input_shape=(3, 32, 32),
)
def build_small(
    num_classes: int, input_shape: tuple[int, ...], width: float, cifar: bool, dropout: float
) -> nn.Module:
    return MobileNetV3(num_classes, input_shape, "small", width, cifar, dropout)


@MODELS.register(
    "mobilenetv3-large", "MobileNetV3-Large for CIFAR-sized inputs; blocks exposed",
    options=_options(), input_shape=(3, 32, 32),
)
def build_large(
    num_classes: int, input_shape: tuple[int, ...], width: float, cifar: bool, dropout: float
) -> nn.Module:
    return MobileNetV3(num_classes, input_shape, "large", width, cifar, dropout)
