"""The networks of the feedback-alignment papers, as flat `nn.Sequential`s.

`fc-bn`: 784-800xL-10 with batch norm (Bacho & Chu's MNIST net); `cnn-small`: 15C5-P2-40C5-P2-128-10, their
shallow CNN. Both are flat so that estimators which need the layer structure (FA, DFA, FDFA) can walk them.
"""

from __future__ import annotations

import math

from torch import nn

from bpfree.core.errors import UsageError
from bpfree.core.registry import Option
from bpfree.models import MODELS


class FCBN(nn.Sequential):
    """Flatten, then L x (Linear, BatchNorm1d, ReLU), then Linear to the classes."""

    def __init__(self, in_features: int, width: int, layers: int, num_classes: int):
        if layers < 1 or width < 1:
            raise UsageError(f"fc-bn needs --layers >= 1 and --width >= 1, got {layers} and {width}")
        mods: list[nn.Module] = [nn.Flatten()]
        fan_in = in_features
        for _ in range(layers):
            # The bias is redundant before batch norm (BN subtracts the mean), so it is left out.
            mods += [nn.Linear(fan_in, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
            fan_in = width
        mods.append(nn.Linear(fan_in, num_classes))
        super().__init__(*mods)


@MODELS.register(
    "fc-bn",
    "fully connected 784-800xL-10 with batch norm (Bacho & Chu's MNIST net)",
    options={
        "layers": Option(2, "number of hidden layers L", minimum=1),
        "width": Option(800, "units per hidden layer", minimum=1),
    },
)
def build_fc_bn(num_classes: int, input_shape: tuple[int, ...], layers: int, width: int) -> FCBN:
    return FCBN(math.prod(input_shape), width, layers, num_classes)


class CNNSmall(nn.Sequential):
    """15C5-P2-40C5-P2-128-10 with ReLU: Conv, ReLU, MaxPool, Conv, ReLU, MaxPool, Flatten, Linear, ReLU, Linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, padding: str):
        if len(input_shape) != 3:
            raise UsageError(f"cnn-small needs image inputs (C, H, W), got shape {tuple(input_shape)}")
        channels, height, width = input_shape
        side = min(height, width)
        if padding == "auto":
            # The paper's net uses unpadded ("valid") 5x5 convolutions: 28 -> 24 -> 12 -> 8 -> 4. Images smaller
            # than 16 pixels (e.g. the 8x8 digits) would vanish, so those get "same" padding instead.
            padding = "valid" if side >= 16 else "same"
        pad = 0 if padding == "valid" else 2

        def after(size: int) -> int:  # spatial size after one conv (5x5, stride 1) and one 2x2 max-pool
            return (size + 2 * pad - 4) // 2

        out_h, out_w = after(after(height)), after(after(width))
        if out_h < 1 or out_w < 1:
            raise UsageError(f"cnn-small: input {height}x{width} is too small for --padding {padding}")
        super().__init__(
            nn.Conv2d(channels, 15, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(15, 40, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(40 * out_h * out_w, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )


@MODELS.register(
    "cnn-small",
    "shallow CNN 15C5-P2-40C5-P2-128-10 (Bacho & Chu)",
    options={
        "padding": Option(
            "auto",
            "conv padding: valid (the paper's), same, or auto (valid unless the image is under 16 pixels)",
            choices=("auto", "valid", "same"),
        ),
    },
)
def build_cnn_small(num_classes: int, input_shape: tuple[int, ...], padding: str) -> CNNSmall:
    return CNNSmall(tuple(input_shape), num_classes, padding)
