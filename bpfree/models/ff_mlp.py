"""Fully connected ReLU network shaped for Forward-Forward (Hinton 2022): the label is part of the input.

The first `num_classes` input values are replaced by a label vector (one-hot for positive/negative data, the
neutral vector 1/C for the readout). Each layer's ReLU activity is length-normalised before the next layer so
the next layer cannot read the previous layer's goodness. `forward` overlays the neutral label and applies a
linear readout to the normalised activities of all layers but the first (Hinton's softmax readout), so `bp`
trains this network as an ordinary classifier and `ff` trains its layers locally.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core.errors import UsageError
from bpfree.core.registry import Option
from bpfree.models import MODELS


def length_normalise(h: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each row to root-mean-square 1 (length sqrt(width)): keeps only the direction of the activity.

    Unit RMS rather than unit length keeps the next layer's inputs O(1) whatever the width.
    """
    return h / (h.pow(2).mean(dim=-1, keepdim=True).sqrt() + eps)


class FFMLP(nn.Module):
    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        hidden: tuple[int, ...],
        label_input: str = "replace",
        label_value: float = 3.0,
    ):
        super().__init__()
        if not hidden:
            raise UsageError("ff-mlp needs at least one hidden layer (--hidden)")
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.label_input = label_input
        self.label_value = label_value
        pixels = math.prod(input_shape)
        if label_input == "replace" and pixels < num_classes:
            raise UsageError(f"ff-mlp: input of {pixels} values cannot hold a {num_classes}-class label")
        widths = [pixels + (num_classes if label_input == "concat" else 0), *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.readout = nn.Linear(sum(self.readout_widths()), num_classes)

    def readout_widths(self) -> list[int]:
        widths = [layer.out_features for layer in self.layers]
        return widths[1:] if len(widths) > 1 else widths

    def with_label(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Flattened input carrying `label` ([B, C] one-hot or neutral), scaled by a fixed constant.

        A fixed constant (never a batch statistic) keeps each example's input independent of the batch.
        """
        flat = x.flatten(1)
        label = label.to(flat.dtype) * self.label_value
        if self.label_input == "concat":
            return torch.cat([label, flat], dim=1)
        return torch.cat([label, flat[:, self.num_classes :]], dim=1)

    def neutral(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_full((x.shape[0], self.num_classes), 1.0 / self.num_classes)

    def activities(self, inputs: torch.Tensor, detach: bool = False) -> list[torch.Tensor]:
        """ReLU activities of every layer for labelled inputs; `detach` cuts the graph between layers."""
        acts = []
        h = inputs
        for layer in self.layers:
            a = torch.relu(layer(h))
            acts.append(a)
            h = length_normalise(a)
            if detach:
                h = h.detach()
        return acts

    def activities_per_label(self, x: torch.Tensor) -> list[torch.Tensor]:
        """ReLU activities [C, B, width] of every layer with each label c overlaid on every example.

        Equal to `activities(with_label(x, onehot(c)))` for each c, but the first layer's image part is computed
        once and shared by the C labels (the label only adds value * W[:, c]): with 784 inputs and 3 x 1000
        units this drops a quarter of the work of goodness inference and of hard negatives.
        """
        flat = x.flatten(1)
        classes, first = self.num_classes, self.layers[0]
        image = flat if self.label_input == "concat" else flat[:, classes:]
        shared = F.linear(image, first.weight[:, classes:], first.bias)  # [B, width]
        label_part = self.label_value * first.weight[:, :classes].t()  # [C, width]
        a = torch.relu(shared[None] + label_part[:, None, :])
        acts = [a]
        for layer in self.layers[1:]:
            a = torch.relu(layer(length_normalise(a)))
            acts.append(a)
        return acts

    def readout_features(self, acts: list[torch.Tensor]) -> torch.Tensor:
        used = acts[1:] if len(acts) > 1 else acts
        return torch.cat([length_normalise(a) for a in used], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acts = self.activities(self.with_label(x, self.neutral(x)))
        return self.readout(self.readout_features(acts))


@MODELS.register(
    "ff-mlp",
    "fully connected ReLU net with the label in the input (Forward-Forward); linear readout",
    options={
        "hidden": Option(
            (2000, 2000, 2000, 2000), "hidden layer widths (Hinton's MNIST: 2000,2000,2000,2000)", type=tuple,
            minimum=1, min_items=1,
        ),
        "label_input": Option(
            "replace",
            "label overwrites the first C input values, or is concatenated",
            choices=("replace", "concat"),
        ),
        # Standardised MNIST pixels reach 2.8, so a label of 1 is fainter than one bright stroke pixel; with
        # 3 the label is learnt much sooner (MNIST, 2x500, 10k images, 5 epochs: 14.5 % vs 17.7 % test error
        # with random negatives; 10.5 % vs 12.3 % with hard negatives).
        "label_value": Option(
            3.0, "value of the 'on' entry of the label one-hot (a fixed constant, never a batch statistic)"
        ),
    },
)
def build_ff_mlp(
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: tuple[int, ...],
    label_input: str,
    label_value: float,
) -> FFMLP:
    return FFMLP(num_classes, input_shape, hidden, label_input, label_value)
