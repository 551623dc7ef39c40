"""Fully connected ReLU network, as a flat `nn.Sequential` (Flatten, Linear, ReLU, ..., Linear).

Methods that need the layer structure (forward gradients, feedback alignment) walk this Sequential.
"""

from __future__ import annotations

import math

from torch import nn

from bpfree.core.registry import Option
from bpfree.models import MODELS


class MLP(nn.Sequential):
    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int):
        layers: list[nn.Module] = [nn.Flatten()]
        widths = [in_features, *hidden]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        super().__init__(*layers)


@MODELS.register(
    "mlp",
    "fully connected ReLU network (hidden widths an option)",
    options={"hidden": Option((1024, 1024), "hidden layer widths, e.g. 1024,1024,1024", type=tuple, minimum=1)},
)
def build_mlp(num_classes: int, input_shape: tuple[int, ...], hidden: tuple[int, ...]) -> MLP:
    return MLP(math.prod(input_shape), hidden, num_classes)
