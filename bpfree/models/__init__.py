"""Model registry. Each module registers its builders in `MODELS`; `build` makes a model by name.

A builder is called as `builder(num_classes=..., input_shape=(C, H, W), **options)` and returns an ordinary
`nn.Module` mapping a batch of images to logits.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from bpfree.registry import Registry

MODELS = Registry("model")


def build(name: str, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28), **options: Any) -> nn.Module:
    """The model `name` for inputs of `input_shape` (C, H, W) and `num_classes` outputs."""
    resolved = MODELS.resolve_options(name, options)
    model = MODELS.get(name).factory(num_classes=num_classes, input_shape=tuple(input_shape), **resolved)
    if getattr(model, "input_shape", None) is None:  # what `bpfree.anatomy.describe` probes with
        model.input_shape = tuple(input_shape)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Importing a family's module registers its models.
from bpfree.models import feedback_nets, ff_mlp, localmixer, mlp, mobilenetv3, resnet  # noqa: E402,F401

__all__ = ["MODELS", "build", "count_parameters"]
