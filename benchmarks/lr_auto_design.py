"""How `--lr auto` spends its probe, chosen on validation data: per-rule priors and probe shapes, compared offline.

For every rule x model of the digits benchmark (benchmarks/lr_auto.py) it records what a probe would see: a fresh
model per grid rate, trained at a constant rate as bpfree/lrfind.py does, its validation loss every 5 steps up to
--max-steps (OUT/trajectories.jsonl; reused if present). Any probe shape that fits the budget (k rates x s steps)
is a prefix of these curves, so each shape's choice is computed without training again, and scored by the
40-epoch validation error of the chosen rate, taken from the oracle's runs (--oracle: a results.jsonl of
benchmarks/lr_auto.py). Test errors are never read. A prior chosen on the same models it is scored on flatters
itself, so the priors are also chosen leaving each model out in turn and scored on that model (leave-one-out).

    PYTHONPATH=. python benchmarks/lr_auto_design.py \\
        --oracle benchmarks/results/lr_auto/digits/results-6-point-probe.jsonl \\
        --out benchmarks/results/lr_auto/digits/design

Writes OUT/design.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lr_suite import SUITE  # noqa: E402

from bpfree import methods, models  # noqa: E402
from bpfree.training import lrfind, recipes  # noqa: E402
from bpfree.training.train import TrainConfig, load_data, lr_multipliers_by_id, make_optimizer  # noqa: E402

GRID = list(lrfind.GRID)
RULES = ("bp", "fa", "sff-block", "l-bp", "dfa", "fdfa", "lg-fg-a", "fg-a")
EVERY = 5  # steps between recorded validation losses


def record(args: argparse.Namespace, path: Path) -> None:
    """Append each missing cell's probe curves to `path`."""
    done = set()
    if path.exists():
        done = {(r["model"], r["rule"]) for r in map(json.loads, path.read_text().splitlines())}
    data = None
    with open(path, "a") as log:
        for model in SUITE:
            for rule in RULES:
                if (model, rule) in done:
                    continue
                name = f"examples/lr_suite.py:{model}"
                values, _ = recipes.apply(rule, name, {"batch_size": args.batch_size})
                cfg = TrainConfig(method=rule, model=name, data=args.data, epochs=args.epochs,
                                  val_split=args.val_split, lr_auto=True, out="unused", **values)
                data = load_data(cfg) if data is None else data
                probe, _ = lrfind.probe_data(cfg, data)
                start = time.perf_counter()
                untrained = lrfind.train_point(cfg, probe, GRID[0], 0).val_loss
                curves = {str(lr): curve(cfg, probe, lr, args.max_steps) for lr in GRID}
                log.write(json.dumps({"model": model, "rule": rule, "untrained": untrained, "curves": curves}) + "\n")
                log.flush()
                print(f"{model} {rule}: {time.perf_counter() - start:.1f} s", flush=True)


def curve(cfg: TrainConfig, data, lr: float, steps: int) -> list[list[float]]:
    """[step, validation loss] every EVERY steps of a fresh model at a constant lr; stops at a non-finite loss."""
    lrfind.seed_all(cfg.seed)
    model = models.build(cfg.model, num_classes=data.num_classes, input_shape=data.input_shape)
    estimator = methods.build(cfg.method, model, seed=cfg.seed)
    optimizer = make_optimizer(replace(cfg, lr=lr), estimator.trainable(), lr_multipliers_by_id(estimator))
    points, step, epoch = [], 0, 0
    while step < steps:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # as the probe shuffles
        for x, y in data.train_batches(min(cfg.batch_size, data.num_train), generator):
            estimator.model.train()
            optimizer.zero_grad(set_to_none=True)
            if not math.isfinite(float(estimator.step(x, y).loss)):
                return points
            optimizer.step()
            step += 1
            if step % EVERY == 0:
                points.append([step, lrfind.validate(estimator, data, cfg, torch.device("cpu"))[1]])
            if step == steps:
                break
        epoch += 1
    return points


def loss_at(cell: dict, lr: float, steps: int) -> float:
    """The validation loss after `steps` (rounded down to a recorded step); inf if the curve stopped before."""
    points = [p for p in cell["curves"][str(lr)] if p[0] <= steps]
    return points[-1][1] if points and points[-1][0] > steps - EVERY else math.inf


def meets(value: float, best: float) -> bool:
    return value <= best + max(2.0, 0.1 * best)


def best_fixed(oracle: dict, rule: str, models_: list[str]) -> float:
    """The grid rate within the goal of the best validation error on most of `models_`; ties: smallest summed gap."""
    def cost(lr: float) -> tuple[int, float]:
        rows = [oracle[(m, rule)]["grid_val"] for m in models_]
        return (-sum(meets(r[GRID.index(lr)], min(r)) for r in rows), sum(r[GRID.index(lr)] - min(r) for r in rows))
    return min(GRID, key=lambda lr: (cost(lr), lr))


MULTIPLIERS = (1, 3, 10)  # candidate factors on a rule's prior for models with batch norm


def at_rate(grid_val: list[float], lr: float) -> float:
    """The validation error at the grid rate nearest lr on a log scale (the grid's top for a rate above it)."""
    return grid_val[min(range(len(GRID)), key=lambda i: abs(math.log(GRID[i] / lr)))]


def best_with_batch_norm(oracle: dict, rule: str, models_: list[str], batch_norm: set[str]) -> tuple[float, int]:
    """A prior and a factor for models with batch norm (prior x factor), chosen as best_fixed chooses a prior:
    within the goal on most of `models_`, ties by the summed gap, then the smaller factor and rate."""
    def cost(base: float, factor: int) -> tuple[int, float]:
        met, gap = 0, 0.0
        for m in models_:
            row = oracle[(m, rule)]["grid_val"]
            value = at_rate(row, min(GRID[-1], base * (factor if m in batch_norm else 1)))
            met += meets(value, min(row))
            gap += value - min(row)
        return -met, gap
    return min(((b, f) for b in GRID for f in MULTIPLIERS), key=lambda c: (cost(*c), c[1], c[0]))


def has_batch_norm(model: str, input_shape: tuple[int, ...] = (1, 8, 8)) -> bool:
    built = models.build(f"examples/lr_suite.py:{model}", num_classes=10, input_shape=input_shape)
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in built.modules())


def probe_shape(k: int, margin: float | None):
    """A chooser: k rates nearest the prior, the steps that fit the budget; with a margin the prior stands unless a
    rate's loss is that fraction below it, without one the lowest loss wins (no signal: the prior)."""
    def choose(cell: dict, prior: float, budget: dict) -> float:
        lrs = lrfind.nearest(tuple(GRID), prior, k)
        steps = ((budget["allowed"] - budget["val_cost"]) // k - budget["val_cost"]) // budget["batch"]
        points = [lrfind.Point(lr, loss_at(cell, lr, steps), 0.0) for lr in lrs]
        for p in points:
            if not math.isfinite(p.val_loss):
                p.status = "diverged"
        if margin is None:
            good = [p for p in points if p.ok]
            if not good:
                return min(lrs) / 10
            pick = min(good, key=lambda p: (p.val_loss, p.lr))
            return prior if pick.val_loss > cell["untrained"] * (1 - lrfind.NO_SIGNAL) else pick.lr
        saved = lrfind.MARGIN
        lrfind.MARGIN = margin
        try:
            return lrfind.choose(points, 0, prior, cell["untrained"])[0]
        finally:
            lrfind.MARGIN = saved
    return choose


def smoothed(cell: dict, lr: float, steps: int, evals: int) -> float:
    """The mean validation loss of the last `evals` recorded points up to `steps` (inf where any is missing)."""
    values = [loss_at(cell, lr, steps - EVERY * j) for j in range(evals)]
    return sum(values) / len(values)


def halving_shape(first: int, keep: int, evals: int, margin: float | None):
    """A chooser by successive halving: every grid rate for `first` steps, scored by its validation loss then; the
    `keep` lowest go on with the rest of the budget, scored by the mean of their last `evals` validation losses
    (one every EVERY steps). With a margin the prior stands, if it survived, unless a rate is that fraction lower."""
    def choose(cell: dict, prior: float, budget: dict) -> float:
        batch, val_cost = budget["batch"], budget["val_cost"]
        left = budget["allowed"] - val_cost - len(GRID) * (first * batch + val_cost)
        more = (left // keep - evals * val_cost) // batch
        final = EVERY * ((first + more) // EVERY)
        if more < EVERY * evals:
            return prior
        first_loss = {lr: loss_at(cell, lr, first) for lr in GRID}
        survivors = sorted(GRID, key=lambda lr: (first_loss[lr], lr))[:keep]
        scores = {lr: smoothed(cell, lr, final, evals) for lr in survivors}
        good = {lr: v for lr, v in scores.items() if math.isfinite(v)}
        if not good:
            return min(GRID) / 10
        pick = min(good, key=lambda lr: (good[lr], lr))
        if good[pick] > cell["untrained"] * (1 - lrfind.NO_SIGNAL):
            return prior
        if margin is not None and prior in good and not good[pick] < good[prior] * (1 - margin):
            return prior
        return pick
    return choose


def score(cells: dict, oracle: dict, chooser, priors) -> tuple[int, float, list[str]]:
    """Cells whose chosen rate's validation error meets the goal, the summed gap, and the misses."""
    met, gap, misses = 0, 0.0, []
    for (model, rule), cell in cells.items():
        grid_val = oracle[(model, rule)]["grid_val"]
        lr = chooser(cell, priors(model, rule), cell["budget"])
        value = grid_val[GRID.index(lr)] if lr in GRID else 100.0
        ok = meets(value, min(grid_val))
        met += ok
        gap += value - min(grid_val)
        if not ok:
            misses.append(f"{rule}/{model} {lr:g}: {value:.1f} vs {min(grid_val):.1f}")
    return met, gap, misses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--oracle", required=True)
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val-split", type=int, default=300)
    p.add_argument("--max-steps", type=int, default=70)
    p.add_argument("--out", default="benchmarks/results/lr_auto/digits/design")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record(args, out / "trajectories.jsonl")
    oracle = {(r["model"], r["rule"]): r for r in map(json.loads, Path(args.oracle).read_text().splitlines())}
    cells = {(r["model"], r["rule"]): r for r in map(json.loads, (out / "trajectories.jsonl").read_text().splitlines())}
    train = 1437 - args.val_split if args.data == "digits" else None
    if train is None:
        raise SystemExit("the budget below is digits' (1,437 training examples)")
    val_cost = math.ceil(lrfind.EVAL_COST * args.val_split)
    for cell in cells.values():
        cell["budget"] = {"allowed": int(lrfind.BUDGET_FRACTION * args.epochs * train), "val_cost": val_cost,
                          "batch": args.batch_size}
    models_ = list(dict.fromkeys(m for m, _ in cells))
    mlp_prior = {r: recipes.lookup(r, "mlp").settings["lr"] for r in RULES}
    everywhere = {r: best_fixed(oracle, r, models_) for r in RULES}
    held_out = {(m, r): best_fixed(oracle, r, [x for x in models_ if x != m]) for m in models_ for r in RULES}
    batch_norm = {m for m in models_ if has_batch_norm(m)}

    def with_bn(fit: tuple[float, int], model: str) -> float:
        lr = fit[0] * (fit[1] if model in batch_norm else 1)
        return min(GRID, key=lambda g: abs(math.log(g / lr)))  # on the grid (and at most its top)
    bn_all = {r: best_with_batch_norm(oracle, r, models_, batch_norm) for r in RULES}
    bn_held_out = {(m, r): best_with_batch_norm(oracle, r, [x for x in models_ if x != m], batch_norm)
                   for m in models_ for r in RULES}
    shapes = [("fixed at the prior, no probe", lambda c, prior, b: prior),
              ("6 rates, lowest loss (the first --lr auto)", probe_shape(6, None))]
    shapes += [(f"{k} rates nearest the prior, prior unless {m:.0%} lower", probe_shape(k, m))
               for k in (2, 3, 4, 6) for m in (0.0, 0.05, 0.1, 0.2)]
    shapes += [(f"halving: 6 rates x {f} steps, {k} go on, mean of last {e} losses, "
                + ("lowest" if m is None else f"prior unless {m:.0%} lower"), halving_shape(f, k, e, m))
               for f in (5, 10) for k in (2, 3) for e in (1, 2) for m in (None, 0.05)]
    lines = ["# --lr auto: probe shapes and priors, scored on validation error", "",
             f"Cells: {len(cells)} (rule x model); the goal per cell: the chosen rate's 40-epoch validation error "
             "within max(2 points, 10 %) of the grid's best. Gap: summed points above the best.", "",
             "Priors chosen on all six models: " + ", ".join(f"{r} {v:g}" for r, v in everywhere.items()), "",
             "Batch-norm factors chosen on all six (prior x factor on models with batch norm: "
             + ", ".join(sorted(batch_norm)) + "): "
             + ", ".join(f"{r} {v[0]:g} x {v[1]}" for r, v in bn_all.items()), "",
             "| probe | mlp prior: met / gap | prior on all six: met / gap | prior leaving the model out: met / gap | "
             "batch-norm-aware prior on all six: met / gap | batch-norm-aware, leaving the model out: met / gap |",
             "|---|---:|---:|---:|---:|---:|"]
    report = {}
    for name, chooser in shapes:
        row = []
        for key, priors in (("mlp", lambda m, r: mlp_prior[r]), ("all", lambda m, r: everywhere[r]),
                            ("loo", lambda m, r: held_out[(m, r)]),
                            ("bn", lambda m, r: with_bn(bn_all[r], m)),
                            ("bn-loo", lambda m, r: with_bn(bn_held_out[(m, r)], m))):
            met, gap, misses = score(cells, oracle, chooser, priors)
            report[(name, key)] = misses
            row.append(f"{met} / {gap:.0f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    chosen = f"{lrfind.POINTS} rates nearest the prior, prior unless {lrfind.MARGIN:.0%} lower"
    lines += ["", f"Misses of the shipped shape ({chosen}), priors leaving the model out:", ""]
    lines += [f"- {m}" for m in report.get((chosen, "loo"), [])]
    lines += ["", "Misses of the shipped shape with batch-norm-aware priors leaving the model out:", ""]
    lines += [f"- {m}" for m in report.get((chosen, "bn-loo"), [])]
    (out / "design.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
