"""Would a probe that never moves a rule's rate above its prior choose better? Offline, on recorded probes.

For every cell of a benchmarks/lr_auto.py results.jsonl (one rule, or all): the shipped choice (the recorded
probe's) and the choice the same probe would make with the grid points above the prior left out
(bpfree/training/lrfind.choose on the rest), each scored by the oracle's validation error at that rate (the
grid's runs, same schedule). Validation errors only; no training.

    python benchmarks/lr_auto_no_upward.py --results benchmarks/results/lr_auto/digits/results.jsonl --rule fdfa
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bpfree import models  # noqa: E402
from bpfree.training import lrfind, recipes  # noqa: E402

GRID = list(lrfind.GRID)


def shipped_prior(rule: str, spec: str) -> float:
    """The prior --lr auto starts from on a model (probes recorded before `prior` was: computed again)."""
    built = models.build(spec, num_classes=10, input_shape=(1, 8, 8))
    return recipes.auto_prior(rule, recipes.PRIORS[rule], recipes.has_batch_norm(built), lrfind.GRID,
                              sum(p.numel() for p in built.parameters()))


def meets(value: float, best: float) -> bool:
    return value <= best + max(2.0, 0.1 * best)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True)
    p.add_argument("--rule", default="")
    args = p.parse_args()
    rows = [r for r in map(json.loads, Path(args.results).read_text().splitlines())
            if (not args.rule or r["rule"] == args.rule) and (r.get("lr_probe") or {}).get("grid")]
    # Test errors, a secondary reading, where the benchmark recorded the grid's (grid_test): each choice's grid run.
    tested = bool(rows) and all("grid_test" in r for r in rows)
    lines = ["| model | rule | prior | probe (rate: val loss) | shipped: rate, val error | no upward: rate, val error "
             "| oracle's best |" + (" test: shipped / no upward / oracle |" if tested else ""),
             "|---|---|---:|---|---|---|---:|" + ("---:|" if tested else "")]
    met = [0, 0]
    gap = [0.0, 0.0]
    met_test = [0, 0]
    gap_test = [0.0, 0.0]
    for r in rows:
        probe = r["lr_probe"]
        spec = r["command_auto"].split("--model ")[1].split()[0] if "command_auto" in r else \
            f"examples/lr_suite.py:{r['model']}"
        prior = float(probe["prior"]["lr"]) if probe.get("prior") else shipped_prior(r["rule"], spec)
        points = [lrfind.Point(lr, loss if loss is not None else math.inf, err, status)
                  for lr, loss, err, status in zip(probe["grid"], probe["val_loss"], probe["val_error"],
                                                   probe["status"])]
        kept = [pt for pt in points if pt.lr <= prior * (1 + 1e-9)]
        untrained = probe["budget"].get("untrained_val_loss", math.inf)
        alt = lrfind.choose(kept, probe["val_examples"], prior, untrained)[0]
        grid_val, best = r["grid_val"], min(r["grid_val"])
        ship_val = grid_val[GRID.index(r["auto_lr"])] if r["auto_lr"] in GRID else 100.0
        alt_val = grid_val[GRID.index(alt)] if alt in GRID else 100.0
        for i, v in enumerate((ship_val, alt_val)):
            met[i] += meets(v, best)
            gap[i] += v - best
        losses = ", ".join(f"{pt.lr:g}: {pt.val_loss:.3f}" for pt in points)
        test = ""
        if tested:
            at = [r["grid_test"][GRID.index(lr)] if lr in GRID else 100.0 for lr in (r["auto_lr"], alt)]
            for i, v in enumerate(at):
                met_test[i] += meets(v, r["oracle_test"])
                gap_test[i] += v - r["oracle_test"]
            test = f" {at[0]:.1f} / {at[1]:.1f} / {r['oracle_test']:.1f} |"
        lines.append(f"| {r['model']} | {r['rule']} | {prior:g} | {losses} | {r['auto_lr']:g}, {ship_val:.1f} | "
                     f"{alt:g}, {alt_val:.1f} | {best:.1f} |{test}")
    lines += ["", f"Within the goal of the oracle's best validation error: shipped {met[0]}, no upward {met[1]}; "
              f"summed gap {gap[0]:.1f} against {gap[1]:.1f} points ({len(rows)} cells)."]
    if tested:
        lines.append(f"Test errors (secondary; each rate's grid run, against the test error of the oracle's "
                     f"validation choice): within the goal shipped {met_test[0]}, no upward {met_test[1]}; summed gap "
                     f"{gap_test[0]:.1f} against {gap_test[1]:.1f} points.")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
