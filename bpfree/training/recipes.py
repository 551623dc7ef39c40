"""Training recipes per (method, model family): what `bpfree train` / `compare` use for every recipe setting the
command line (or config file) does not give.

A recipe fixes the optimizer, learning rate, schedule and the like, never the data, model or epoch budget. Each
entry says where it comes from: `validated` (chosen by `bpfree sweep` on validation error; the command and date are
in `source`), `carried over` (chosen on the test set before validation splits existed; to be replaced by a sweep)
or `auto` (any model without a validated entry: the learning rate is found by `--lr auto`, bpfree/training/lrfind.py).
Lookup: (method, model) first, then (method, model family), then (method, any model), then the generic fallback.
docs/tuning.md lists the sweeps behind the validated entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from bpfree.training.config import RECIPE_FIELDS, TrainConfig

# What a field is when neither a recipe nor the user gives it (the library's defaults before recipes existed).
BASE = {f.name: f.default for f in fields(TrainConfig) if f.name in RECIPE_FIELDS}

ANY = "*"
CARRIED = "carried over: chosen on the test set before validation splits existed (not validated)"
UNTUNED = "carried over: one setting for every method, set before validation splits existed (not validated)"


@dataclass(frozen=True)
class Recipe:
    settings: dict[str, Any]
    source: str
    validated: bool = False
    key: tuple[str, str] = field(default=(ANY, ANY))

    @property
    def name(self) -> str:
        return f"{self.key[0]}/{self.key[1]}"


def _sgd(lr: float) -> dict[str, Any]:
    return {"optimizer": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine",
            "warmup_epochs": 0.0}


def _adam(lr: float) -> dict[str, Any]:
    return {"optimizer": "adam", "lr": lr, "weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 0.0}


SWEPT = ("MNIST, first 10000 of the training examples left after holding out 5000 for validation, 3 epochs, cosine, "
         "benchmarks/tuning_sweeps.sh, 2026-12-01; docs/tuning.md")
MLP_SWEEP = f"validated: bpfree sweep --methods bp,fg-a,fg-w --model mlp ({SWEPT})"
LOCAL_METHODS = "bp,l-bp,lg-bp,fg-w,fg-a,lg-fg-w,lg-fg-a,fa,l-fa,lg-fa,dfa"
MIXER_SWEEP = (f"validated: bpfree sweep --methods {LOCAL_METHODS} --model localmixer-m1-16 --optimizer sgd "
               f"--lr 3e-3,0.01,0.03,0.1,0.3 ({SWEPT})")
S11_SWEEP = (f"validated: bpfree sweep --methods {LOCAL_METHODS} --model localmixer-s1-1 --optimizer sgd "
             f"--lr 3e-3,0.01,0.03,0.1,0.3 ({SWEPT})")
FA_SWEEP = f"validated: bpfree sweep --methods fa,dfa,fdfa --model mlp --optimizer adam ({SWEPT})"
LOCAL_SWEEP = (f"validated: bpfree sweep --methods l-bp,l-fa,lg-fg-a,lg-fg-w,sff,sff-block,ff --model mlp "
               f"--optimizer adam ({SWEPT})")
SAME_AS = "{2}; chosen for {0}, whose update {1} equals exactly"
RESNET_SWEEP = ("validated: bpfree sweep --methods bp,dfa,fdfa (and lg-fg-a --groups 2) --model resnet18 --width 16 "
                "--data cifar10 --train-size 10000 --val-split 5000 --epochs 2 --lr 0.01,0.03,0.1 --schedule cosine, "
                "2026-12-01; docs/results.md")
L_FA = 0.3
# Models without a validated entry: the learning rate is found on validation data before training (`--lr auto`):
# the probe tries each rule's prior below and its two grid neighbours, and keeps the prior unless a neighbour is
# clearly better (training/lrfind.py). Adam, not SGD: Adam's step does not scale with the gradient's size, which these
# rules leave arbitrary (fg-a's tangent noise, DFA's random feedback scale, local heads), so one grid fits every
# rule (benchmarks/lr_auto_sgd.py). The priors of the eight rules of the auto-vs-oracle benchmark
# (benchmarks/lr_auto.sh, six model types the table had never seen, digits) are MEASURED_PRIORS: per rule, the rate of
# the 6-point grid that came within max(2 points, 10 %) of the best validation error on most of the six models, ties
# by the summed gap (benchmarks/lr_auto_design.py; validation errors only). The other rules keep their validated
# mlp rate (MLP_SWEEP / LOCAL_SWEEP), not measured on other models.
AUTO = ("auto: learning rate found on validation data before training (training/lrfind.py), Adam, cosine; the prior "
        "measured on six unseen model types by benchmarks/lr_auto_design.py (docs/tuning.md)")
MEASURED_PRIORS = {"bp": 1e-2, "fa": 1e-2, "sff-block": 3e-2, "l-bp": 1e-2, "dfa": 3e-2, "fdfa": 3e-3,
                   "lg-fg-a": 3e-3, "fg-a": 3e-3}
# A model with batch norm starts from the rule's prior times BATCH_NORM_FACTORS, taken to the nearest grid rate (x3
# moves 3e-3 to 1e-2 on the 1-3-10 grid; at most its top, 3e-2): batch norm makes a layer's output blind to its
# weights' scale, so the weights grow and the same Adam rate moves them less, and on the suite's two batch-norm models
# (ResBNCNN, DepthwiseCNN) these rules' best rates were 3-10x the other four's. Chosen with the priors by
# benchmarks/lr_auto_design.py (per rule, prior and factor in {1, 3, 10} within the goal on most of the six models;
# validation errors only); leaving each model out, the factors added no met cell beside the probe (docs/tuning.md):
# two batch-norm models are a small sample.
BATCH_NORM_FACTORS = {"bp": 3, "sff-block": 3, "fdfa": 10, "lg-fg-a": 10}
# fg-a's prior scales with the model's size instead: SIZE_SCALED_PRIORS[rule] / sqrt(number of parameters), taken to
# the nearest grid rate, with no batch-norm factor. Why: fg-a's estimate is mostly noise, which Adam turns into a
# step of about lr on every parameter in a random direction, and the output's random change grows with the square
# root of how many parameters take one. Chosen on validation errors by benchmarks/lr_auto_fga.py over several size
# measures, and checked on models it was not chosen on: a better default than the fixed prior there, not a law
# (docs/tuning.md, "fg-a's prior").
SIZE_SCALED_PRIORS = {"fg-a": 0.2}
# A linear warm-up over this share of the run's steps on models without a validated entry (a share, not epochs, so
# it means the same for a run of any length; the probe warms up over the same share of its steps). dfa only: on the
# digits suite 5 % lowered --lr auto's validation error on all six models (benchmarks/lr_auto.sh step 2d; the share
# fixed beforehand from step 2c's 2 of 40 epochs, not chosen on the suite); fdfa, lg-fg-a, fg-a: see docs/tuning.md.
WARMUP_FRACTIONS = {"dfa": 0.05}
PRIORS = {"bp": 3e-3, "fg-w": 3e-3, "fg-a": 1e-2, "fa": 1e-3, "dfa": 3e-3, "fdfa": 3e-3, "l-bp": 3e-3,
          "l-fa": 3e-3, "lg-bp": 3e-3, "lg-fa": 3e-3, "lg-fg-a": 1e-3, "lg-fg-w": 1e-2, "sff": 1e-3,
          "sff-block": 1e-3, "ff": 3e-3, **MEASURED_PRIORS}

# (method, model or family) -> (settings, source, validated). Keep the sources honest: only a sweep that was run
# makes an entry "validated".
_TABLE: dict[tuple[str, str], tuple[dict[str, Any], str, bool]] = {
    # mlp (MNIST)
    ("bp", "mlp"): (_adam(3e-3), MLP_SWEEP, True),
    ("fg-w", "mlp"): (_adam(3e-3), MLP_SWEEP, True),
    ("fg-a", "mlp"): (_adam(1e-2), MLP_SWEEP, True),
    ("fa", "mlp"): (_adam(1e-3), FA_SWEEP, True),
    ("dfa", "mlp"): (_adam(3e-3), FA_SWEEP, True),
    ("fdfa", "mlp"): (_adam(3e-3), FA_SWEEP, True),
    ("l-bp", "mlp"): (_adam(3e-3), LOCAL_SWEEP, True),
    ("l-fa", "mlp"): (_adam(3e-3), LOCAL_SWEEP, True),
    ("lg-bp", "mlp"): (_adam(3e-3), SAME_AS.format("l-bp", "lg-bp", LOCAL_SWEEP), True),
    ("lg-fa", "mlp"): (_adam(3e-3), SAME_AS.format("l-fa", "lg-fa", LOCAL_SWEEP), True),
    ("lg-fg-a", "mlp"): (_adam(1e-3), LOCAL_SWEEP, True),
    ("lg-fg-w", "mlp"): (_adam(1e-2), LOCAL_SWEEP, True),
    ("sff", "mlp"): (_adam(1e-3), LOCAL_SWEEP, True),
    ("sff-block", "mlp"): (_adam(1e-3), LOCAL_SWEEP, True),
    ("ff", "mlp"): (_adam(3e-3), LOCAL_SWEEP, True),
    # resnet18 (CIFAR-10)
    **{(m, "resnet18"): (_sgd(lr), RESNET_SWEEP, True)
       for m, lr in (("bp", 0.03), ("dfa", 0.03), ("fdfa", 0.03), ("lg-fg-a", 0.1))},
    # Any other model: Adam + cosine with the learning rate found by `--lr auto` (bpfree/training/lrfind.py), whose grid
    # is centred on the rule's validated mlp rate (the prior, also used when the run is too short to probe).
    **{(m, ANY): ({**_adam(lr), "warmup_fraction": WARMUP_FRACTIONS.get(m, 0.0)}, AUTO, False)
       for m, lr in PRIORS.items()},
    # LocalMixer: validated on M/1/16 (MNIST); the family's other models (M/8/16 on CIFAR-10) borrow them.
    **{(m, "localmixer"): (_sgd(lr), MIXER_SWEEP, True)
       for m, lr in (("bp", 0.1), ("l-bp", 0.1), ("lg-bp", 0.1), ("fg-w", 0.1), ("fg-a", 0.01), ("lg-fg-w", 0.1),
                     ("lg-fg-a", 0.1), ("fa", 0.1), ("l-fa", L_FA), ("lg-fa", L_FA), ("dfa", 0.3))},
    # LocalMixer S/1/1: its own sweep.
    **{(m, "localmixer-s1-1"): (_sgd(lr), S11_SWEEP, True)
       for m, lr in (("bp", 0.1), ("l-bp", 0.1), ("lg-bp", 0.1), ("fg-w", 0.1), ("fg-a", 0.01), ("lg-fg-w", 0.1),
                     ("lg-fg-a", 0.01), ("fa", 0.3), ("l-fa", L_FA), ("lg-fa", L_FA), ("dfa", 0.3))},
    # Forward-Forward (README Forward-Forward section, MNIST 3x1000)
    ("ff", "ff-mlp"): ({"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.05, "schedule": "cosine",
                        "warmup_epochs": 0.0, "batch_size": 100},
                       f"{CARRIED}; README Forward-Forward sweep, MNIST 3x1000", False),
    # Feedback-alignment benchmark nets (benchmarks/feedback_alignment.py: Adam 1e-3, batch 64, every method alike)
    **{(m, fam): ({"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "schedule": "constant",
                   "warmup_epochs": 0.0, "batch_size": 64},
                  f"{UNTUNED}; benchmarks/feedback_alignment.py", False)
       for m in ("bp", "fa", "dfa", "fdfa") for fam in ("fc-bn", "cnn-small")},
}

FALLBACK = Recipe(dict(BASE), "the library's defaults before recipes existed (not validated for any method)")


def family(model: str) -> str:
    """localmixer-m1-16 -> localmixer, mobilenetv3-small -> mobilenetv3; other models are their own family."""
    for prefix in ("localmixer", "mobilenetv3"):
        if model.startswith(prefix + "-"):
            return prefix
    return model


def lookup(method: str, model: str) -> Recipe:
    """The most specific recipe for this method and model (the generic fallback if none)."""
    for key in ((method, model), (method, family(model)), (method, ANY)):
        if key in _TABLE:
            settings, source, validated = _TABLE[key]
            return Recipe({**BASE, **settings}, source, validated, key=key)
    return FALLBACK


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def auto_prior(method: str, lr: float, batch_norm: bool, grid: tuple[float, ...], parameters: int = 0) -> float:
    """The learning rate `--lr auto` starts from on a model without a validated entry: the rule's prior `lr`; for a
    rule in SIZE_SCALED_PRIORS (given the model's number of `parameters`) the point of the probe's `grid` nearest
    (log scale) to its scale / sqrt(parameters); on a model with batch norm the grid point nearest to lr times the
    rule's BATCH_NORM_FACTORS entry, so at most the grid's top."""
    if method in SIZE_SCALED_PRIORS and parameters > 0:
        return nearest_rate(grid, size_scaled_rate(method, parameters))
    factor = BATCH_NORM_FACTORS.get(method, 1) if batch_norm else 1
    if factor == 1:
        return lr
    return nearest_rate(grid, lr * factor)


def size_scaled_rate(method: str, parameters: int) -> float:
    """A SIZE_SCALED_PRIORS rule's rate for a model of `parameters` parameters, before it is put on the grid."""
    return SIZE_SCALED_PRIORS[method] / math.sqrt(parameters)


def nearest_rate(grid: tuple[float, ...], lr: float) -> float:
    """The grid point nearest lr on a log scale (ties: the lower one)."""
    return min(grid, key=lambda g: (abs(math.log(g / lr)), g))


def entries() -> dict[tuple[str, str], Recipe]:
    """Every table entry (for docs and tests)."""
    return {key: lookup(*key) for key in _TABLE}


def apply(method: str, model: str, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill the recipe fields missing from `given` (None = not given) from the recipe for (method, model).

    Returns the values of all RECIPE_FIELDS and the record stored as `recipe` in config.json: the entry used, its
    source, and which fields were given instead.
    """
    recipe = lookup(method, model)
    values, overridden = {}, []
    for name in RECIPE_FIELDS:
        if given.get(name) is not None:
            values[name] = given[name]
            if given[name] != recipe.settings[name]:
                overridden.append(name)
        else:
            values[name] = recipe.settings[name]
    record = {"entry": recipe.name, "validated": recipe.validated, "source": recipe.source,
              "overridden": overridden}
    return values, record
