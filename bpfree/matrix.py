"""The method x model matrix: every registered learning rule built on every kind of network, on tiny inputs.

Columns: the shipped models at tiny sizes plus two networks written as a user would (`ResidualCNN`: an ordinary
`nn.Module` with residuals and batch norm; `TinyViT`: patches + `nn.TransformerEncoder`). A cell is either a rule
that builds and steps (`check` also asks that it lowers its own loss on one fixed batch) or a documented undefined
case: the one-line `UsageError` that building or stepping it raises. `bpfree methods --matrix` prints the table by
building every cell, so the table cannot disagree with the code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bpfree import methods, models
from bpfree.errors import UsageError


class ResidualCNN(nn.Module):
    """A user's own residual CNN with batch norm: an nn.Module, not an nn.Sequential."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 16, 16)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(self.bn(self.conv(h)) + h)
        h = torch.relu(self.down(h))
        return self.fc(h.mean((2, 3)))


class TinyViT(nn.Module):
    """A small Vision Transformer: 4x4-pixel patches, a positional embedding, `nn.TransformerEncoder`, mean pool."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 16, 16), dim: int = 32):
        super().__init__()
        self.patch = nn.Conv2d(input_shape[0], dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, (input_shape[1] // 4) * (input_shape[2] // 4), dim))
        layer = nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(t)).mean(1))


def _user(cls: type[nn.Module], shape: tuple[int, ...]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = cls(10, shape)
        model.input_shape = shape
        return model
    return make


#: column name -> a function building the tiny model (the seed is set by the caller)
MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": lambda: models.build("mlp", 10, (1, 8, 8), hidden=(16, 16)),
    "fc-bn": lambda: models.build("fc-bn", 10, (1, 8, 8), layers=2, width=16),
    "cnn-small": lambda: models.build("cnn-small", 10, (1, 8, 8)),
    "resnet18": lambda: models.build("resnet18", 10, (3, 16, 16), width=4),
    "mobilenetv3-small": lambda: models.build("mobilenetv3-small", 10, (3, 8, 8), width=0.25),
    "localmixer-m8-16": lambda: models.build("localmixer-m8-16", 10, (3, 32, 32), channels=16, groups=4),
    "ff-mlp": lambda: models.build("ff-mlp", 10, (1, 8, 8), hidden=(16, 16)),
    "ResidualCNN": _user(ResidualCNN, (3, 16, 16)),
    "TinyViT": _user(TinyViT, (3, 16, 16)),
}

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


def build_cell(method: str, model_name: str, seed: int = 0) -> tuple[methods.Estimator, torch.Tensor, torch.Tensor]:
    """(estimator, x, y) for one cell; raises UsageError where the rule is undefined for the model."""
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    x, y = fixed_batch(tuple(model.input_shape))
    return methods.build(method, model, seed=seed), x, y


def objective(result: methods.StepResult) -> float:
    """A step's own objective: its loss plus every block's local loss where the rule reports them."""
    extra = result.extra or {}
    return float(result.loss) + sum(v for k, v in extra.items() if k.startswith("local_loss_"))


def losses(method: str, model_name: str, steps: int = 3) -> tuple[float, float]:
    """The estimator's own objective on the fixed batch before any update and after `steps` Adam steps."""
    est, x, y = build_cell(method, model_name)
    lr = LEARNING_RATES.get((method, model_name), LEARNING_RATES.get(model_name, 1e-2))
    opt = torch.optim.Adam(est.trainable(), lr=lr)
    first = last = objective(est.step(x, y))
    for _ in range(steps):
        opt.step()
        last = objective(est.step(x, y))  # measured before this step's update: `steps` updates so far
    return first, last


def cell(method: str, model_name: str) -> str | None:
    """None where the rule builds and takes a step, else the one-line reason it is undefined (a UsageError), or
    "error: ..." for any other failure (a bug: the matrix test fails on it)."""
    try:
        est, x, y = build_cell(method, model_name)
        est.step(x, y)
    except UsageError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - reported in the table, never hidden
        return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def table(method_names: list[str] | None = None, model_names: list[str] | None = None) -> str:
    """The matrix as a Markdown table (✓, or ✗n with footnote n: the reason), each cell built and stepped for real."""
    rows = method_names or methods.METHODS.names()
    cols = model_names or list(MODELS)
    reasons: list[str] = []
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in rows:
        marks = []
        for c in cols:
            why = cell(m, c)
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
