"""Learning rules. Each module registers its methods in `METHODS`; `build` makes an estimator by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from bpfree.methods.base import Estimator, StepResult
from bpfree.registry import Registry

METHODS = Registry("method")


def build(name: str, model: nn.Module, seed: int = 0, **options: Any) -> Estimator:
    """The estimator `name` for `model`, options type-checked and defaults filled."""
    resolved = METHODS.resolve_options(name, options)
    return METHODS.get(name).factory(model, seed=seed, **resolved)


# Importing a family's module registers its methods.
from bpfree.methods import bp, feedback_alignment, forward_forward, forward_gradient, local  # noqa: E402,F401

__all__ = ["METHODS", "Estimator", "StepResult", "build"]
