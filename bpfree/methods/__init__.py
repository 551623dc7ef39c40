"""Learning rules. Each module registers its methods in `METHODS`; `build` makes an estimator by name.

Generic rules read the model through its anatomy (`bpfree.anatomy`). A model-specific fast path for a (method,
model class) pair is an estimator factory registered with `register_fast_path` by a module that knows the model;
`build` prefers it, so no generic method file imports a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from bpfree.anatomy import check_block_names
from bpfree.checks import check_forward_mode_can_train
from bpfree.methods.base import Estimator, StepResult
from bpfree.registry import Registry

METHODS = Registry("method")
# Rules whose weight gradients come from forward-mode tangents, which pass through torch.no_grad().
FORWARD_MODE = ("fg-w", "fg-a", "lg-fg-w", "lg-fg-a")
Factory = Callable[..., Estimator]
FAST_PATHS: dict[tuple[str, type], Factory] = {}


def register_fast_path(method: str, model_class: type) -> Callable[[Factory], Factory]:
    """Register an estimator factory used for `method` on instances of `model_class` (and its subclasses)."""

    def decorate(factory: Factory) -> Factory:
        if (method, model_class) in FAST_PATHS:
            raise ValueError(f"fast path for {method!r} on {model_class.__name__} registered twice")
        FAST_PATHS[(method, model_class)] = factory
        return factory

    return decorate


def fast_path(method: str, model: nn.Module) -> Factory | None:
    for cls in type(model).__mro__:
        if (method, cls) in FAST_PATHS:
            return FAST_PATHS[(method, cls)]
    return None


def build(
    name: str, model: nn.Module, seed: int = 0, blocks: Sequence[str] | None = None, **options: Any
) -> Estimator:
    """The estimator `name` for `model`, options type-checked and defaults filled.

    `blocks` names the submodules whose outputs are the local-learning boundaries (default: found by
    `bpfree.anatomy.describe`).
    """
    resolved = METHODS.resolve_options(name, options)
    factory = fast_path(name, model) or METHODS.get(name).factory
    extra = {"blocks": tuple(blocks)} if blocks else {}
    if blocks:
        check_block_names(model, tuple(blocks))
    if name in FORWARD_MODE:
        check_forward_mode_can_train(model, name)
    return factory(model, seed=seed, **extra, **resolved)


# Importing a family's module registers its methods.
from bpfree.methods import block_local, bp, feedback_alignment, forward_forward, forward_gradient  # noqa: E402,F401

__all__ = ["FAST_PATHS", "METHODS", "Estimator", "StepResult", "build", "fast_path", "register_fast_path"]

# Model-specific fast paths register last: they build on the generic families.
import bpfree.fastpaths  # noqa: E402,F401
