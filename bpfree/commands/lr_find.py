"""`bpfree lr-find`: the learning-rate range test of `--lr auto`, on its own: a table, a plot and a JSON file.

Each grid point trains a fresh model from the same seed for the same number of steps and is scored on validation
examples (the run's --val-split, else a split carved from the training set; never the test set). Without --steps,
the grid and steps are those `bpfree train --lr auto` would use for the same options (10 % of the planned
training); the optimizer, schedule warm-up and batch size are the run's (recipe or flags).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from bpfree import models
from bpfree.commands.train import DEFAULTS, add_training_arguments, config_from_args, set_threads
from bpfree.core.errors import UsageError
from bpfree.training import lrfind


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, staged=False)
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (every grid point's)")
    parser.add_argument("--lr-grid", default=None, metavar="LR,LR,...",
                        help="learning rates to try (default: "
                        f"{','.join(f'{g:g}' for g in lrfind.GRID)}: the rule's prior and its {lrfind.POINTS - 1} "
                        "neighbours there, fewer where the budget is short; with --steps-per-point, all of them)")
    parser.add_argument("--steps-per-point", type=int, default=None,
                        help="training steps per grid point (default: what fits 10 %% of --epochs of training, at "
                        f"most {lrfind.MAX_STEPS}); given, every grid point is tried")
    parser.add_argument("--out", default=None, help="folder for lr_find.json and lr_find.png "
                        "(default runs/lr-find-METHOD-MODEL-DATA)")


def parse_grid(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        grid = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--lr-grid: expected learning rates separated by commas, got {text!r}") from None
    if len(grid) < 2 or len(set(grid)) != len(grid) or not all(g > 0 and math.isfinite(g) for g in grid):
        raise UsageError(f"--lr-grid: expected at least two distinct positive learning rates, got {text!r}")
    return grid


def run(args: argparse.Namespace) -> int:
    if args.steps_per_point is not None and args.steps_per_point < 1:
        raise UsageError(f"--steps-per-point must be at least 1, got {args.steps_per_point}")
    grid = parse_grid(args.lr_grid)
    set_threads(args.threads)
    name = f"lr-find-{args.method}-{models.short_name(args.model)}-{args.data}".replace(":", "_").replace("/", "_")
    out = Path(args.out or f"runs/{name}")
    lr = args.lr
    args.lr = None if lr in (None, "auto") else lr  # a given number is the prior the default grid centres on
    cfg = config_from_args(args, out=str(out))
    cfg.check()
    probe = lrfind.find(cfg, grid=grid, steps=args.steps_per_point)
    if not probe.points and probe.budget.get("allowed_examples"):
        raise UsageError(f"the budget of 10 % of {cfg.epochs} epochs ({probe.budget['allowed_examples']} examples) "
                         f"fits no probe of {lrfind.MIN_STEPS}+ steps per point: give --steps-per-point or more "
                         "--epochs")
    if not probe.points:
        raise UsageError(f"nothing to probe on: {probe.reason.split(':')[0]}")
    lrfind.write(probe, out, cfg)
    print(f"lr-find: {cfg.method} on {cfg.model}, {cfg.data}; optimizer {cfg.optimizer}, {probe.steps} steps per "
          f"point, batch {cfg.batch_size}, {probe.val_examples} validation examples, {probe.seconds:.1f} s")
    print(lrfind.table(probe), end="")
    print(f"chosen lr {probe.choice:g}: {probe.reason}")
    print(f"(plot and probe in {out}/lr_find.png, {out}/lr_find.json)")
    return 0
