"""Learning rules. Each module registers its methods in `METHODS`; `build` makes an estimator by name.

Generic rules read the model through its anatomy (`bpfree.core.anatomy`). A model-specific fast path for a (method,
model class) pair is an estimator factory registered with `register_fast_path` by a module that knows the model;
`build` prefers it, so no generic method file imports a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from bpfree.core.anatomy import check_block_names, check_parameter_reach
from bpfree.core.errors import UsageError
from bpfree.core.registry import Registry
from bpfree.methods.base import Estimator, StepResult

METHODS = Registry("method", on_register=lambda entry: _declare(entry.factory, entry.options))
# Rules whose weight gradients come from forward-mode tangents, which pass through torch.no_grad().
FORWARD_MODE = ("fg-w", "fg-a", "lg-fg-w", "lg-fg-a")
Factory = Callable[..., Estimator]
FAST_PATHS: dict[tuple[str, type], Factory] = {}


#: (method, model class) -> options whose non-default values that fast path cannot honour (build refuses them).
FAST_PATH_REFUSES: dict[tuple[str, type], tuple[str, ...]] = {}


def register_fast_path(method: str, model_class: type, refuses: tuple[str, ...] = ()) -> Callable[[Factory], Factory]:
    """Register an estimator factory used for `method` on instances of `model_class` (and its subclasses).

    `refuses`: the method's options this path does not honour; `build` refuses a non-default value of one with a
    line saying so, rather than ignoring it.
    """

    def decorate(factory: Factory) -> Factory:
        if (method, model_class) in FAST_PATHS:
            raise ValueError(f"fast path for {method!r} on {model_class.__name__} registered twice")
        FAST_PATHS[(method, model_class)] = factory
        FAST_PATH_REFUSES[(method, model_class)] = refuses
        _declare(factory, METHODS.get(method).options)
        return factory

    return decorate


def _check_fast_path_options(name: str, model: nn.Module, resolved: dict[str, Any]) -> None:
    for cls in type(model).__mro__:
        if (name, cls) in FAST_PATHS:
            defaults = METHODS.get(name).options
            for key in FAST_PATH_REFUSES[(name, cls)]:
                if key in resolved and resolved[key] != defaults[key].default:
                    raise UsageError(f"{name} on {type(model).__name__}: --{key.replace('_', '-')} is not supported "
                                     f"by this model's fast path (leave it at {defaults[key].default})")
            return


def find_fast_path(method: str, model: nn.Module) -> Factory | None:
    """The fast path registered for `method` on the model's class (or a base class), or None."""
    for cls in type(model).__mro__:
        if (method, cls) in FAST_PATHS:
            return FAST_PATHS[(method, cls)]
    return None


def build(
    name: str,
    model: nn.Module,
    seed: int = 0,
    blocks: Sequence[str] | None = None,
    fast_path: bool = True,
    **options: Any,
) -> Estimator:
    """The estimator `name` for `model`, options type-checked and defaults filled.

    `blocks` names the submodules whose outputs are the local-learning boundaries (default: found by
    `bpfree.core.anatomy.describe`). `fast_path=False` builds the generic rule even where a fast path is registered
    for the model's class, without that path's refusals (what the fast path must agree with:
    tests/fastpaths/test_contract.py).
    """
    resolved = METHODS.resolve_options(name, options)
    factory = METHODS.get(name).factory
    if fast_path:
        _check_fast_path_options(name, model, resolved)
        factory = find_fast_path(name, model) or factory
    extra = {"blocks": tuple(blocks)} if blocks else {}
    if blocks:
        check_block_names(model, tuple(blocks))
    # The generic rule asked for beside a fast path (the contract test) is built as it is, to compare what agrees.
    layer_calls = getattr(factory, "acts_on_layer_calls", False) and (fast_path or find_fast_path(name, model) is None)
    check_parameter_reach(model, name, forward_mode=name in FORWARD_MODE, layer_calls=layer_calls)
    return factory(model, seed=seed, **extra, **resolved)


def _declare(factory: Factory, options: dict[str, Any]) -> None:
    """An estimator class reads its registered options (`Estimator.declared`): one declaration, one path."""
    if isinstance(factory, type) and issubclass(factory, Estimator):
        if "declared" in vars(factory) and factory.declared != options:
            raise ValueError(f"{factory.__name__} is registered with two option sets")
        factory.declared = options


# Importing a family's module registers its methods.
from bpfree.methods import block_local, bp, feedback_alignment, forward_forward, forward_gradient  # noqa: E402,F401

__all__ = ["FAST_PATHS", "METHODS", "Estimator", "StepResult", "build", "find_fast_path", "register_fast_path"]

# Model-specific fast paths register last: they build on the generic families.
import bpfree.fastpaths  # noqa: E402,F401
