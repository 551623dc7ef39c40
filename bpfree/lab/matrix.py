"""The method x model matrix: every registered learning rule built on every kind of network, on tiny inputs.

Columns: the shipped models at tiny sizes, plus any user's models (`user_columns`: `file.py:Class`, as
`bpfree train --model` takes them). A cell is either a rule that builds and steps (`losses` also tells whether it
lowers its own loss on one fixed batch) or a documented undefined case: the one-line `UsageError` that building or
stepping it raises. `bpfree methods --matrix [--model FILE:Class ...]` prints the table by building every cell, so
the table cannot disagree with the code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from bpfree import methods, models
from bpfree.core.errors import UsageError

Maker = Callable[[], nn.Module]
Columns = Mapping[str, Maker]

#: column name -> a function building the tiny model (the seed is set by the caller)
MODELS: dict[str, Maker] = {
    "mlp": lambda: models.build("mlp", 10, (1, 8, 8), hidden=(16, 16)),
    "fc-bn": lambda: models.build("fc-bn", 10, (1, 8, 8), layers=2, width=16),
    "cnn-small": lambda: models.build("cnn-small", 10, (1, 8, 8)),
    "resnet18": lambda: models.build("resnet18", 10, (3, 16, 16), width=4),
    "mobilenetv3-small": lambda: models.build("mobilenetv3-small", 10, (3, 8, 8), width=0.25),
    "localmixer-m8-16": lambda: models.build("localmixer-m8-16", 10, (3, 32, 32), channels=16, groups=4),
    "ff-mlp": lambda: models.build("ff-mlp", 10, (1, 8, 8), hidden=(16, 16)),
}

#: The input shape of a user's model column unless another is given.
USER_INPUT_SHAPE = (3, 16, 16)


def user_columns(specs: Sequence[str], input_shape: tuple[int, ...] = USER_INPUT_SHAPE) -> dict[str, Maker]:
    """Columns for users' models (`path/to/file.py:Class` or `package.module:name`), named by the class or function;
    each is built once here so that a model that cannot be built or does not fit `input_shape` is a UsageError now,
    not a column of failures."""
    columns: dict[str, Maker] = {}
    for spec in specs:
        name = models.short_name(spec)
        if models.user_model(spec) is None:
            raise UsageError(f"--model {spec}: a column is a user's model, path/to/file.py:Class "
                             "(the registered models are columns already)")
        if name in columns or name in MODELS:
            raise UsageError(f"--model {spec}: a column named {name!r} is there already")
        models.build(spec, 10, input_shape)
        columns[name] = lambda spec=spec: models.build(spec, 10, input_shape)
    return columns

#: Adam learning rates, by (method, model) or by model, where the default 1e-2 is not the size for a few steps on one
#: batch: cnn-small has no normalisation (dfa's kaiming-uniform B there needs less still); ff on LocalMixer sees the
#: label in 3 of 64 tokens and learns slowly.
LEARNING_RATES: dict[tuple[str, str] | str, float] = {
    "cnn-small": 3e-3, ("dfa", "cnn-small"): 1e-3, ("ff", "localmixer-m8-16"): 3e-2,
}

#: The undefined cells: (method, model) -> the reason (the UsageError building or stepping the cell raises says it).
UNDEFINED: dict[tuple[str, str], str] = {}


def fixed_batch(shape: tuple[int, ...], n: int = 32, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A small learnable task: each class adds its own random pattern to unit noise (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    patterns = torch.randn(classes, *shape, generator=g)
    return torch.randn(n, *shape, generator=g) + patterns[y], y


def build_cell(
    method: str, model_name: str, seed: int = 0, columns: Columns = MODELS
) -> tuple[methods.Estimator, torch.Tensor, torch.Tensor]:
    """(estimator, x, y) for one cell; raises UsageError where the rule is undefined for the model."""
    torch.manual_seed(seed)
    model = columns[model_name]()
    x, y = fixed_batch(tuple(model.input_shape))
    return methods.build(method, model, seed=seed), x, y


def objective(result: methods.StepResult) -> float:
    """A step's own objective: its loss plus every block's local loss where the rule reports them."""
    extra = result.extra or {}
    return float(result.loss) + sum(v for k, v in extra.items() if k.startswith("local_loss_"))


def losses(method: str, model_name: str, steps: int = 3, columns: Columns = MODELS) -> tuple[float, float]:
    """The estimator's own objective on the fixed batch before any update and after `steps` Adam steps."""
    est, x, y = build_cell(method, model_name, columns=columns)
    lr = LEARNING_RATES.get((method, model_name), LEARNING_RATES.get(model_name, 1e-2))
    opt = torch.optim.Adam(est.trainable(), lr=lr)
    first = last = objective(est.step(x, y))
    for _ in range(steps):
        opt.step()
        last = objective(est.step(x, y))  # measured before this step's update: `steps` updates so far
    return first, last


def cell(method: str, model_name: str, columns: Columns = MODELS) -> str | None:
    """None where the rule builds and takes a step, else the one-line reason it is undefined (a UsageError), or
    "error: ..." for any other failure (a bug: the matrix test fails on it)."""
    try:
        est, x, y = build_cell(method, model_name, columns=columns)
        est.step(x, y)
    except UsageError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - reported in the table, never hidden
        return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def table(
    method_names: list[str] | None = None, model_names: list[str] | None = None, extra: Columns | None = None
) -> str:
    """The matrix as a Markdown table (✓, or ✗n with footnote n: the reason), each cell built and stepped for real.

    `extra`: more columns after the shipped models (`user_columns`)."""
    columns = {**MODELS, **(extra or {})}
    rows = method_names or methods.METHODS.names()
    cols = model_names or list(columns)
    reasons: list[str] = []
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in rows:
        marks = []
        for c in cols:
            why = cell(m, c, columns)
            if why is None:
                marks.append("✓")
            else:
                if why not in reasons:
                    reasons.append(why)
                marks.append(f"✗{reasons.index(why) + 1}")
        lines.append(f"| {m} | " + " | ".join(marks) + " |")
    if reasons:
        lines += [""] + [f"✗{i + 1}: {r}" for i, r in enumerate(reasons)]
    return "\n".join(lines)
