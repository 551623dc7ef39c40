"""The learning-rate finder behind `bpfree lr-find` and `--lr auto`: short runs over a log grid, scored on
validation data carved from the training set.

Why short runs and not one increasing sweep (fastai's `lr_find`, Lightning's `Tuner.lr_find`): a one-sweep range
test reads the loss of one model while its learning rate grows, so each rate is judged on a model shaped by all the
smaller rates before it, over a handful of steps. That works for backprop's low-noise gradients. It misleads for
these rules: a forward-gradient estimate is so noisy that a few steps per rate measure the noise, not the rate;
FDFA learns its feedback weights while it trains, and DFA / local rules align their layers only after many steps,
so the damage of a too-high rate shows up later than the sweep looks (the sweep then recommends it). Here every
grid point is a fresh model from the same seed, trained for the same number of steps at a constant rate and then
scored on held-out validation examples: a rate is judged by what it has done after those steps, delayed effects
included up to that horizon, and a divergence (NaN/inf, or the training loss blowing up) marks that rate "too
high" instead of stopping anything.

What is probed: the rule's prior (a per-rule rate measured across several model types, times a per-rule factor on
models with batch norm; fg-a's scaled by the model's size: bpfree/training/recipes.py) and its two neighbours on
the grid, and a neighbour replaces the prior only when clearly better: a few dozen steps order the rates of the
noisy and delayed rules poorly, so the probe spends its budget on longer runs near a good guess and guards against
a prior that is wrong for this model rather than ranking six rates it cannot tell apart.

Budget: `--lr auto` spends at most BUDGET_FRACTION of the planned training work (examples through the model,
validation examples counted like training ones) on the probe; where that leaves fewer than MIN_STEPS steps per
point for two grid points, it trains with the rule's prior learning rate and says so. Counting examples rather than
seconds keeps the choice deterministic: the same seed gives the same choice.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bpfree import methods, models
from bpfree.core.errors import DivergedError
from bpfree.data.datasets import VALIDATION_SEED, TensorData
from bpfree.training import distributed, recipes
from bpfree.training.checkpoint import CHECKPOINT, CONFIG, METRICS
from bpfree.training.runfolder import RunLock
from bpfree.training.train import TrainConfig, load_data, lr_multipliers_by_id, make_optimizer
from bpfree.training.transfer import load_backbone

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # Adam's useful range for every rule on the models measured
POINTS = 3  # --lr auto probes the rule's prior and its two grid neighbours, with three times the steps of all six
MARGIN = 0.05  # a neighbour replaces the prior only with a validation loss this fraction below the prior's
BUDGET_FRACTION = 0.10  # of the planned training work
MIN_STEPS = 10  # fewer steps per point measure the first steps' noise, not the rate
MAX_STEPS = 300  # more adds cost but, on the measured models, no better choices
VAL_FRACTION = 6  # the carved validation split: a sixth of the training set ...
VAL_MAX = 1000  # ... at most this many examples (a standard error of about 0.7 points at 10 % error)
NO_SIGNAL = 0.005  # a best validation loss within this fraction of the untrained model's: the probe saw nothing
EVAL_COST = 1 / 3  # a validation example's cost in training examples (see `plan`)
BLOW_UP = 3.0  # a training loss (last 5 steps) this many times the untrained one: the rate diverged
PROBE_PLOT = "lr_probe.png"
PROBE_WAIT = 24 * 3600.0  # data-parallel: seconds the other ranks wait for rank 0's probe (a dead rank 0 ends it)


@dataclass
class Point:
    """One grid point: its validation loss and error (%) after the probe's steps, or why it has none."""

    lr: float
    val_loss: float = math.inf
    val_error: float = 100.0
    status: str = "ok"  # or "diverged: ..."

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Probe:
    """What the finder did and chose; `record()` is what config.json stores as `lr_probe`."""

    points: list[Point]
    steps: int
    val_examples: int
    choice: float
    reason: str
    seconds: float = 0.0
    budget: dict[str, Any] = field(default_factory=dict)
    val_indices: list[int] | None = None  # which training examples were held out (not stored: can be large)
    prior: dict[str, Any] = field(default_factory=dict)  # the rate the probe started from, and why

    def record(self) -> dict[str, Any]:
        return {"prior": self.prior, "grid": [p.lr for p in self.points], "val_loss": [p.val_loss for p in self.points],
                "val_error": [p.val_error for p in self.points], "status": [p.status for p in self.points],
                "steps": self.steps, "val_examples": self.val_examples, "choice": self.choice,
                "reason": self.reason, "seconds": round(self.seconds, 3), "budget": self.budget}


# -- the data the probe sees --------------------------------------------------------------------------------------
def probe_data(cfg: TrainConfig, data: Any) -> tuple[TensorData | None, list[int] | None]:
    """Training and validation examples for the probe, never the test set (the returned data set has none).

    With the run's own --val-split the probe uses it; otherwise it carves one from the training set with the same
    constant-seed draw as --val-split (the real run still trains on every training example). None where there is
    nothing to probe on: image folders (streamed from disk) and training sets too small to split.
    """
    if not isinstance(data, TensorData):
        return None, None
    indices = None
    if data.num_val == 0:
        n = min(VAL_MAX, data.num_train // VAL_FRACTION)
        if n < 10:
            return None, None
        indices = torch.randperm(data.num_train, generator=torch.Generator().manual_seed(VALIDATION_SEED))[:n]
        indices = sorted(indices.tolist())
        data = data.hold_out(n)
    keep = min(VAL_MAX, data.num_val)
    empty = data.train_x[:0], data.train_y[:0]
    return TensorData(data.name, data.train_x, data.train_y, *empty, data.num_classes, data.augment,
                      data.val_x[:keep], data.val_y[:keep]), indices


def default_grid(cfg: TrainConfig) -> tuple[float, ...]:
    """GRID for Adam / AdamW; ten times higher for SGD with momentum (the table's SGD sweeps chose 0.01-0.3)."""
    return tuple(lr * 10 for lr in GRID) if cfg.optimizer == "sgd" else GRID


def starting_rate(cfg: TrainConfig, data: Any) -> tuple[float, dict[str, Any]]:
    """The prior the probe centres on: cfg.lr, or on a model without a validated recipe entry whose rate and optimizer
    the user left to it (`--lr auto` on the entry METHOD/*), the rule's prior adjusted for the model's size or batch
    norm (recipes.auto_prior)."""
    record: dict[str, Any] = {"lr": cfg.lr, "from": "the run's learning rate"}
    entry = cfg.recipe or {}
    sized = cfg.method in recipes.SIZE_SCALED_PRIORS
    if (entry.get("entry") != f"{cfg.method}/{recipes.ANY}" or {"lr", "optimizer"} & set(entry.get("overridden", []))
            or (recipes.BATCH_NORM_FACTORS.get(cfg.method, 1) == 1 and not sized)):  # no need to build the model
        return cfg.lr, record
    try:
        model = models.build(cfg.model, num_classes=data.num_classes, input_shape=data.input_shape,
                             **cfg.model_options)
    except AttributeError:  # data that does not say its shape: the rule's prior as it is
        return cfg.lr, record
    if sized:
        parameters = sum(p.numel() for p in model.parameters())
        scale = recipes.SIZE_SCALED_PRIORS[cfg.method]
        lr = recipes.auto_prior(cfg.method, cfg.lr, False, default_grid(cfg), parameters)
        return lr, {"lr": lr, "from": f"the rule's size-scaled prior {scale:g} / sqrt({parameters:,} parameters) = "
                    f"{recipes.size_scaled_rate(cfg.method, parameters):.3g} to the grid (recipes.SIZE_SCALED_PRIORS)"}
    batch_norm = recipes.has_batch_norm(model)
    lr = recipes.auto_prior(cfg.method, cfg.lr, batch_norm, default_grid(cfg))
    factor = recipes.BATCH_NORM_FACTORS[cfg.method]
    record = {"lr": lr, "from": f"the rule's prior {cfg.lr:g}" + (
        f" x {factor} to the grid for a model with batch norm (recipes.BATCH_NORM_FACTORS)" if batch_norm else "")}
    return lr, record


# -- the plan -----------------------------------------------------------------------------------------------------
def nearest(grid: tuple[float, ...], prior: float, k: int) -> list[float]:
    """The k grid points closest to the prior on a log scale, in increasing order."""
    ranked = sorted(grid, key=lambda lr: (abs(math.log(lr / prior)), lr))
    return sorted(ranked[:k])


def plan(cfg: TrainConfig, run_examples: int, probe: TensorData, grid: tuple[float, ...] = GRID
         ) -> tuple[list[float], int, dict[str, Any]]:
    """The grid points and steps per point that fit BUDGET_FRACTION of the planned training work.

    run_examples: training examples per epoch of the real run. Work is counted in examples through the model;
    a validation example counts as EVAL_COST of a training one (a forward pass against forward plus backward or
    tangent passes), and the real run's own per-epoch evaluation is not counted (so the probe's share is
    overestimated).
    """
    planned = cfg.epochs * run_examples
    allowed = int(BUDGET_FRACTION * planned)
    batch = min(cfg.batch_size, probe.num_train)
    val_cost = math.ceil(EVAL_COST * probe.num_val)
    budget = {"planned_examples": planned, "allowed_examples": allowed, "fraction": BUDGET_FRACTION}
    for k in range(min(POINTS, len(grid)), 1, -1):  # one validation pass more: the untrained model's
        steps = min(MAX_STEPS, ((allowed - val_cost) // k - val_cost) // batch)
        if steps >= MIN_STEPS:
            budget["probe_examples"] = k * (steps * batch + val_cost) + val_cost
            return nearest(grid, cfg.lr, k), steps, budget
    budget["probe_examples"] = 0
    return [], 0, budget


# -- one grid point -----------------------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def train_point(cfg: TrainConfig, data: TensorData, lr: float, steps: int, bar: tqdm | None = None) -> Point:
    """A fresh model from cfg.seed, `steps` steps at a constant `lr` (after cfg's warm-up, scaled to the probe),
    then scored on the validation examples. A divergence is returned as the point's status, never raised."""
    seed_all(cfg.seed)
    device = torch.device(cfg.device)
    model = models.build(cfg.model, num_classes=data.num_classes, input_shape=data.input_shape,
                         **cfg.model_options).to(device)
    if cfg.init_from:
        load_backbone(model, cfg.init_from)
    estimator = methods.build(cfg.method, model, seed=cfg.seed, blocks=cfg.blocks, **cfg.method_options)
    optimizer = make_optimizer(replace(cfg, lr=lr), estimator.trainable(), lr_multipliers_by_id(estimator))
    warmup = round(steps * (cfg.warmup_epochs / cfg.epochs + cfg.warmup_fraction))  # the run's share of its steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    point = Point(lr)
    try:
        train_steps(estimator, optimizer, schedule, data, cfg, steps, device, bar)
    except DivergedError as e:
        point.status = f"diverged: {e}"
        return point
    point.val_error, point.val_loss = validate(estimator, data, cfg, device)
    if not math.isfinite(point.val_loss):
        point.status, point.val_loss, point.val_error = "diverged: validation loss not finite", math.inf, 100.0
    return point


def train_steps(estimator: methods.Estimator, optimizer: torch.optim.Optimizer, schedule: Any, data: TensorData,
                cfg: TrainConfig, steps: int, device: torch.device, bar: tqdm | None) -> None:
    """Train `steps` steps (epochs repeat as needed); raises DivergedError on NaN/inf or a blown-up loss."""
    estimator.model.train()
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # as the real run shuffles
        for x, y in data.train_batches(min(cfg.batch_size, data.num_train), generator):
            if len(losses) == steps:
                break
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = float(estimator.step(x, y).loss)
            if not math.isfinite(loss):
                raise DivergedError(f"loss {loss} at step {len(losses) + 1}")
            optimizer.step()
            schedule.step()
            losses.append(loss)
            if bar is not None:
                bar.update(1)
        epoch += 1
    if not losses:
        return
    start, end = losses[0], _mean(losses[-5:])  # the first loss is the untrained model's
    if end > BLOW_UP * start and end - start > 0.5:  # a rising loss is a rate that is too high, even if finite
        raise DivergedError(f"training loss rose from {start:.3g} to {end:.3g}")


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


@torch.no_grad()
def validate(estimator: methods.Estimator, data: TensorData, cfg: TrainConfig, device: torch.device
             ) -> tuple[float, float]:
    """Error (%) and mean cross-entropy on the probe's validation examples."""
    estimator.model.eval()
    wrong, loss = 0, 0.0
    for x, y in data.val_batches(cfg.eval_batch_size):
        x, y = x.to(device), y.to(device)
        logits = estimator.predict(x).float()
        wrong += int((logits.argmax(1) != y).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    n = max(1, data.num_val)
    return 100.0 * wrong / n, (loss / n if math.isfinite(loss) else math.inf)


# -- the choice ---------------------------------------------------------------------------------------------------
def choose(points: list[Point], n_val: int, prior: float, untrained: float = math.inf) -> tuple[float, str]:
    """The rule's prior, unless a grid point's validation loss is MARGIN below the prior's (then the lowest loss;
    ties: the lower rate).

    Why the prior first: after the probe's few steps (1-3 % of a run) the order of the rates is noisy and biased
    towards high rates, and on the benchmark's six model types a measured per-rule prior alone met the goal more
    often than the lowest probe loss did (docs/tuning.md); the probe still moves a run away from a prior that is
    clearly worse or diverges on its model. Loss, not error: after a few steps most rules are near chance at
    every rate. Where the prior was not probed (`bpfree lr-find --lr-grid`), the lowest loss, unless no rate
    lowered it below the untrained model's by NO_SIGNAL of it: then the probe saw nothing and the prior stands.
    A probed prior that diverged, or whose validation loss ended BLOW_UP times the untrained model's, gives way
    to a rate MARGIN lower even then. None finite: below the grid."""
    good = [p for p in points if p.ok]
    if not good:
        low = min(p.lr for p in points) / 10 if points else prior
        return low, "every grid point diverged: a tenth of the lowest"
    pick = min(good, key=lambda p: (p.val_loss, p.lr))
    at_prior = next((p for p in good if math.isclose(p.lr, prior, rel_tol=1e-9)), None)
    # A probed prior that diverged, or whose validation loss blew up (local rules: their training losses are their
    # blocks' own and can stay low while the output's grows), did harm: "no signal" does not keep it.
    prior_harmful = any(math.isclose(p.lr, prior, rel_tol=1e-9) and not p.ok for p in points) or (
        at_prior is not None and at_prior.val_loss > BLOW_UP * untrained)
    if at_prior is not None and not pick.val_loss < at_prior.val_loss * (1 - MARGIN):
        return prior, (f"the rule's prior: no rate's validation loss was {MARGIN:.0%} below its "
                       f"{at_prior.val_loss:.4f} (validation error {at_prior.val_error:.2f} % on {n_val} examples; "
                       f"untrained {untrained:.4f})")
    if not prior_harmful and pick.val_loss > untrained * (1 - NO_SIGNAL):
        return prior, (f"no rate lowered the validation loss measurably (best {pick.val_loss:.4f}, untrained "
                       f"{untrained:.4f}): the rule's prior")
    return pick.lr, (f"lowest validation loss {pick.val_loss:.4f} (validation error {pick.val_error:.2f} % on "
                     f"{n_val} examples; untrained {untrained:.4f})")


# -- the finder ---------------------------------------------------------------------------------------------------
def find(cfg: TrainConfig, data: Any = None, grid: tuple[float, ...] | None = None, steps: int | None = None,
         show_progress: bool | None = None) -> Probe:
    """Probe the learning rates for cfg. Without `steps`: cfg.lr (the rule's prior) and its grid neighbours, POINTS
    in all (fewer when the budget is short), with the steps that fit BUDGET_FRACTION of cfg's planned training."""
    start = time.perf_counter()
    data = load_data(cfg) if data is None else data
    lr, prior = starting_rate(cfg, data)
    cfg = replace(cfg, lr=lr)
    run_examples = data.num_train
    pdata, indices = probe_data(cfg, data)
    if pdata is None:
        return Probe([], 0, 0, cfg.lr, f"no validation split to probe on ({data.num_train} training examples, "
                     f"{type(data).__name__}): the rule's prior", time.perf_counter() - start, {"allowed_examples": 0},
                     prior=prior)
    grid = tuple(sorted(grid or default_grid(cfg)))
    if steps is None:
        lrs, steps, budget = plan(cfg, run_examples, pdata, grid)
    else:
        lrs, budget = list(grid), {"steps_given": steps}
    if not lrs:
        return Probe([], 0, pdata.num_val, cfg.lr, "budget too small for a probe: the rule's prior",
                     time.perf_counter() - start, budget, indices, prior)
    show = sys.stderr.isatty() if show_progress is None else show_progress
    bar = tqdm(total=len(lrs) * steps, desc="lr probe", disable=not show, leave=False, file=sys.stderr)
    untrained = train_point(cfg, pdata, lrs[0], 0).val_loss  # the yardstick: what no training gives
    points = []
    for lr in lrs:
        bar.set_postfix(lr=f"{lr:g}")
        points.append(train_point(cfg, pdata, lr, steps, bar))
    bar.close()
    choice, reason = choose(points, pdata.num_val, cfg.lr, untrained)
    budget["untrained_val_loss"] = untrained
    return Probe(points, steps, pdata.num_val, choice, reason, time.perf_counter() - start, budget, indices, prior)


def note(message: str) -> None:
    print(f"bpfree: {message}", file=sys.stderr, flush=True)


def saved_probe(cfg: TrainConfig) -> dict[str, Any] | None:
    """The config.json of cfg's run folder, if it records a probe (a resumed or rerun run keeps its choice)."""
    path = Path(cfg.out) / CONFIG
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("lr_probe"), dict) else None


def resolve(cfg: TrainConfig, data: Any = None, show_progress: bool | None = None,
            group: distributed.Group = distributed.LOCAL) -> TrainConfig:
    """cfg with lr_auto set: its learning rate chosen by the probe (or the run folder's recorded choice).

    Data-parallel (`group` active): rank 0 alone probes (or reads the recorded choice: ranks need not share a file
    system) and sends the rate and the probe's record to the other ranks, which wait for it."""
    if not cfg.lr_auto or cfg.lr_probe is not None:
        return cfg
    if group.active:
        def probe_on_main() -> bytes:
            _resolve_here(cfg, data, show_progress)
            return json.dumps({"lr": cfg.lr, "lr_probe": cfg.lr_probe}).encode()

        chosen = json.loads(group.run_on_main(probe_on_main, max(cfg.dist_timeout, PROBE_WAIT)))
        cfg.lr, cfg.lr_probe = float(chosen["lr"]), chosen["lr_probe"]
        return cfg
    return _resolve_here(cfg, data, show_progress)


def resolve_joined(cfg: TrainConfig, data: Any = None, show_progress: bool | None = None) -> distributed.Group:
    """--lr auto before a run: the run's process group is joined first (launched by torchrun: data-parallel ranks
    or stages), so rank 0 alone probes and the others take its choice. Returns the group to shut down after the
    run (LOCAL where none was joined)."""
    if not cfg.lr_auto:
        return distributed.LOCAL
    group, _ = distributed.init_from_env(cfg.device, cfg.dist_timeout)
    resolve(cfg, data, show_progress, group)
    return group


def _resolve_here(cfg: TrainConfig, data: Any, show_progress: bool | None) -> TrainConfig:
    saved = saved_probe(cfg)
    if saved is not None:  # --resume, or compare / sweep rerunning a folder: the recorded choice, no new probe
        cfg.lr, cfg.lr_probe = float(saved["lr"]), saved["lr_probe"]
        note(f"{cfg.out}: lr {cfg.lr:g}, chosen by the probe recorded in {CONFIG}")
        return cfg
    out = Path(cfg.out)
    if (out / CHECKPOINT).exists() or (out / METRICS).exists():
        # Without --resume the trainer refuses the folder; with it, a run from before --lr auto keeps its own
        # settings or is refused for differing: either way a probe would be wasted.
        return cfg
    # The run folder is locked while its probe runs and its plot is written: a folder in use is refused before any
    # probing, and another run's plot is never overwritten.
    lock = RunLock(out).acquire()
    try:
        probe = find(cfg, data, show_progress=show_progress)
        cfg.lr, cfg.lr_probe = probe.choice, probe.record()
        if probe.points:
            note(f"lr auto ({cfg.method}): {len(probe.points)} rates x {probe.steps} steps on {probe.val_examples} "
                 f"validation examples in {probe.seconds:.1f} s -> lr {cfg.lr:g}")
            try:
                plot(probe, out / PROBE_PLOT, f"{cfg.method} on {models.short_name(cfg.model)}, {cfg.data}")
            except OSError:
                pass  # the trainer reports an unusable folder
    finally:
        lock.release()
    # Else the run is too short to probe: it trains at the prior, as config.json's lr_probe and the summary say
    # (no notice here: a run that then stops on bad input prints its one error line only).
    return cfg


def resolve_all(configs: list[TrainConfig], data: Any = None) -> Any:
    """Resolve every config that asks for --lr auto (they share one data set); returns the data, loaded if needed."""
    for cfg in configs:
        if cfg.lr_auto and cfg.lr_probe is None and saved_probe(cfg) is None and data is None:
            data = load_data(cfg)
        resolve(cfg, data)
    return data


# -- output -------------------------------------------------------------------------------------------------------
def table(probe: Probe) -> str:
    lines = ["| lr | val loss | val error (%) | status | chosen |", "|---:|---:|---:|---|---|"]
    for p in probe.points:
        mark = "**✓**" if p.lr == probe.choice else ""
        loss = f"{p.val_loss:.4f}" if p.ok else ""
        err = f"{p.val_error:.2f}" if p.ok else ""
        lines.append(f"| {p.lr:g} | {loss} | {err} | {p.status} | {mark} |")
    return "\n".join(lines) + "\n"


def plot(probe: Probe, path: Path, title: str = "") -> None:
    """Validation loss and error against the learning rate (log axis); diverged points as red crosses at the top,
    the choice as a dashed line."""
    from bpfree.lab.plots import plt  # matplotlib with its file-only backend selected

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    ok = [p for p in probe.points if p.ok]
    bad = [p for p in probe.points if not p.ok]
    for ax, key, label in ((axes[0], "val_loss", "validation loss"), (axes[1], "val_error", "validation error (%)")):
        ax.plot([p.lr for p in ok], [getattr(p, key) for p in ok], "o-", color="tab:blue")
        top = max([getattr(p, key) for p in ok], default=1.0)
        if bad:
            ax.plot([p.lr for p in bad], [top * 1.05] * len(bad), "x", color="firebrick", markersize=9,
                    label="diverged")
            ax.legend(loc="best")
        ax.axvline(probe.choice, linestyle="--", color="black", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}{'; ' if title else ''}chosen lr {probe.choice:g} ({probe.steps} steps per point)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(probe: Probe, out: Path, cfg: TrainConfig) -> None:
    """lr_find.json (the probe, and the settings it ran with) and lr_find.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("lr_probe", "recipe")}
    (out / "lr_find.json").write_text(json.dumps({"probe": probe.record(), "config": settings}, indent=2,
                                                 default=str) + "\n")
    plot(probe, out / "lr_find.png", f"{cfg.method} on {models.short_name(cfg.model)}, {cfg.data}")
