"""ResNet18, CIFAR variant (He et al. 2016): 3x3 stride-1 stem, no max-pool, four stages of two basic blocks.

The network is an ordered `blocks` ModuleList (stem, then the eight basic blocks) plus a `head` (global
average pool + linear), so `bp` trains it as an ordinary model while block-local rules (`sff`,
`sff-block`) wrap it block by block. Any input size and channel count works (global pooling),
e.g. 1x28x28 for fast tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bpfree.core.registry import Option
from bpfree.models import MODELS

# A callback a block applies between its inner conv layers. Identity for ordinary training; layer-wise local
# rules use it to end one local unit there (loss on the activity, then normalise + detach for the next unit).
Between = Callable[[torch.Tensor], torch.Tensor] | None


class ConvBNAct(nn.Sequential):
    """conv -> batch norm -> activation (optional): the smallest unit a layer-wise rule trains."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU
    ):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1-conv projection) shortcut."""

    splittable = True  # accepts `between`: it has more than one conv layer

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride)
        self.conv2 = ConvBNAct(cout, cout, 3, 1, act=None)
        self.shortcut: nn.Module = (
            ConvBNAct(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, between: Between = None) -> torch.Tensor:
        h = self.conv1(x)
        if between is not None:
            # The second unit still sees the block input through the shortcut; that input is already detached
            # by the caller when training locally, so no gradient leaves the block.
            h = between(h)
        return self.relu(self.conv2(h) + self.shortcut(x))


class Head(nn.Sequential):
    """Global average pooling then a linear classifier."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], width: int = 64):
        super().__init__()
        self.input_shape = tuple(input_shape)
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks: list[nn.Module] = [ConvBNAct(input_shape[0], width, 3)]
        cin = width
        for stage, cout in enumerate(widths):
            for i in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = Head(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@MODELS.register(
    "resnet18",
    "ResNet18, CIFAR variant (3x3 stem, no max-pool); blocks exposed for block-local rules",
    options={"width": Option(64, "channels of the first stage (64 = standard; 8-16 for quick runs)", minimum=1)},
    input_shape=(3, 32, 32),
)
def build_resnet18(num_classes: int, input_shape: tuple[int, ...], width: int) -> ResNet18:
    return ResNet18(num_classes, input_shape, width)
