"""Model registry. Each module registers its builders in `MODELS`; `build` makes a model by name.

A builder is called as `builder(num_classes=..., input_shape=(C, H, W), **options)` and returns an ordinary
`nn.Module` mapping a batch of images to logits.

A user's own model is named `path/to/file.py:Name` or `package.module:name`: `Name` is a class or factory called
with `num_classes` and `input_shape` (those of its parameters it has, by keyword) that returns an `nn.Module`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bpfree.core.anatomy import eval_mode
from bpfree.core.errors import UsageError
from bpfree.core.registry import Registry

MODELS = Registry("model")
_LOADED: dict[str, Callable[..., Any]] = {}


def user_model(name: str) -> tuple[str, str] | None:
    """(file or module, attribute) for a user's model `file.py:Name` / `module:name`; None for a registered name."""
    if ":" not in name:
        if name.endswith(".py"):
            raise UsageError(f"--model {name}: name the class or function in the file too: {name}:Name")
        return None
    target, _, attr = name.rpartition(":")
    if not target or not attr.isidentifier():
        raise UsageError(f"--model {name}: expected path/to/file.py:Name or package.module:name")
    return target, attr


# What user code (a model file, its class) may raise; SystemExit too, so that a sys.exit() in it becomes one line and
# exit 2 instead of ending bpfree with the user's code. KeyboardInterrupt still interrupts.
USER_ERRORS = (Exception, SystemExit)


def user_error(error: BaseException) -> str:
    """`ValueError: bad shape`, or `it called sys.exit(7)`, for a message about user code."""
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r})"
    return f"{type(error).__name__}: {error}"


def _import(name: str, target: str) -> Any:
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UsageError(f"--model {name}: no file {target}")
        # A module name of its own per file, so that classes defined there can be found again (pickling).
        module_name = "bpfree_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"--model {name}: cannot load {target} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except USER_ERRORS as e:
            del sys.modules[module_name]
            raise UsageError(f"--model {name}: importing {target} failed: {user_error(e)}") from None
        return module
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name is not None and target.startswith(e.name):
            hint = "for a file, give its path ending in .py"
            raise UsageError(f"--model {name}: no module {e.name!r} ({hint})") from None
        raise UsageError(f"--model {name}: importing {target} failed: {type(e).__name__}: {e}") from None
    except USER_ERRORS as e:
        raise UsageError(f"--model {name}: importing {target} failed: {user_error(e)}") from None


def load_user_model(name: str) -> Callable[..., Any]:
    """The class or factory a user's model name points to (imported once per process)."""
    if name not in _LOADED:
        spec = user_model(name)
        assert spec is not None
        target, attr = spec
        obj = getattr(_import(name, target), attr, None)
        if obj is None:
            raise UsageError(f"--model {name}: {target} has no attribute {attr!r}")
        if not callable(obj):
            raise UsageError(f"--model {name}: {attr} is a {type(obj).__name__}, not a class or function")
        _LOADED[name] = obj
    return _LOADED[name]


def check(name: str) -> None:
    """A registered model name, or a user's model that can be imported (UsageError otherwise)."""
    if user_model(name) is None:
        MODELS.get(name)
    else:
        load_user_model(name)


def resolve_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """A registered model's options, defaults filled; a user's model takes none (its file sets its sizes)."""
    if user_model(name) is None:
        return MODELS.resolve_options(name, given)
    flags = sorted("--" + k.replace("_", "-") for k, v in given.items() if v is not None)
    if flags:
        raise UsageError(f"--model {name}: model options ({', '.join(flags)}) apply to the registered models only")
    return {}


def short_name(name: str) -> str:
    """A name for folders: the attribute of a user's model, the name itself otherwise."""
    spec = user_model(name)
    return name if spec is None else spec[1]


def _build_user(name: str, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    factory = load_user_model(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "input_shape": input_shape}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    call = f"{short_name(name)}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        model = factory(**kwargs)
    except USER_ERRORS as e:
        raise UsageError(f"--model {name}: {call} failed: {user_error(e)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {name}: {call} returned a {type(model).__name__}, not an nn.Module")
    if not any(True for _ in model.parameters()):
        raise UsageError(f"--model {name}: {call} has no parameters to train")
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError(f"--model {name}: {call} has every parameter frozen (requires_grad=False): nothing to train")
    # One probe batch, so that a model that does not fit the data says so here, in one line.
    try:
        with eval_mode(model), torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except USER_ERRORS as e:
        raise UsageError(f"--model {name}: {call} fails on a batch shaped {(2, *input_shape)}: "
                         f"{user_error(e)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"--model {name}: {call} returns {got} for a batch of 2, expected logits (2, {num_classes})")
    if not out.is_floating_point():
        raise UsageError(f"--model {name}: {call} returns {out.dtype} logits; losses need floating-point logits")
    return model


def build(name: str, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28), **options: Any) -> nn.Module:
    """The model `name` (registered, or a user's `file.py:Name`) for inputs of `input_shape` and `num_classes`."""
    if user_model(name) is not None:
        resolve_options(name, options)
        model = _build_user(name, num_classes, tuple(input_shape))
    else:
        resolved = MODELS.resolve_options(name, options)
        model = MODELS.get(name).factory(num_classes=num_classes, input_shape=tuple(input_shape), **resolved)
    if getattr(model, "input_shape", None) is None:  # what `bpfree.core.anatomy.describe` probes with
        model.input_shape = tuple(input_shape)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Importing a family's module registers its models.
from bpfree.models import feedback_nets, ff_mlp, localmixer, mlp, mobilenetv3, resnet  # noqa: E402,F401

__all__ = ["MODELS", "build", "check", "count_parameters", "load_user_model", "resolve_options", "short_name",
           "user_model"]
