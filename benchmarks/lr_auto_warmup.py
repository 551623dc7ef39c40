"""Does a short linear warm-up help the rules whose gradient scale is arbitrary or delayed (dfa, fdfa, lg-fg-a,
fg-a) on the digits suite? Each cell is rerun with Adam, cosine and --warmup-epochs W at the oracle's best rate
and at the grid rate above it (3x), and set beside the oracle's runs without warm-up at the same rates
(benchmarks/lr_auto.py's results.jsonl, --oracle). Validation errors only: test errors are not read.

    PYTHONPATH=. python benchmarks/lr_auto_warmup.py --oracle benchmarks/results/lr_auto/digits/results.jsonl \\
        --out benchmarks/results/lr_auto/digits/warmup

Writes OUT/warmup.jsonl (a line per run, as it finishes; finished runs are reused) and OUT/warmup.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lr_auto import run  # noqa: E402  (benchmarks/ is on the path when run as a script)

from bpfree.training.lrfind import GRID

RULES = ("dfa", "fdfa", "lg-fg-a", "fg-a")
MODELS = ("LayerNormMLP", "Conv1DNet", "TinyMixer", "DepthwiseCNN", "ResBNCNN", "TinyTransformer")


def rates(grid_val: list[float]) -> list[float]:
    """The oracle's best grid rate and the one above it (below it where the best is the grid's top)."""
    best = min(range(len(GRID)), key=lambda i: (grid_val[i], i))
    other = best + 1 if best + 1 < len(GRID) else best - 1
    return [GRID[best], GRID[other]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--oracle", required=True)
    p.add_argument("--warmup-epochs", type=float, default=2.0)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--out", default="benchmarks/results/lr_auto/digits/warmup")
    args = p.parse_args()
    oracle = {(r["model"], r["rule"]): r for r in map(json.loads, Path(args.oracle).read_text().splitlines())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path("runs") / "lr_auto" / "warmup"
    rows = []
    with open(out / "warmup.jsonl", "w") as log:
        for model in args.models.split(","):
            for rule in args.rules.split(","):
                grid_val = oracle[(model, rule)]["grid_val"]
                for lr in rates(grid_val):
                    argv = ["train", "--method", rule, "--model", f"examples/lr_suite.py:{model}", "--data", "digits",
                            "--epochs", str(args.epochs), "--batch-size", "32", "--val-split", "300", "--threads",
                            "1", "--lr", f"{lr:g}", "--warmup-epochs", f"{args.warmup_epochs:g}"]
                    r = run(argv, root / f"w{args.warmup_epochs:g}" / model / rule / f"lr={lr:g}", args.epochs)
                    row = {"model": model, "rule": rule, "lr": lr, "warmup_epochs": args.warmup_epochs,
                           "val_error": r["val_error"], "val_loss": r["val_loss"], "status": r["status"],
                           "no_warmup_val_error": grid_val[GRID.index(lr)], "grid_best_val": min(grid_val),
                           "seconds": r["seconds"], "command": "bpfree " + " ".join(argv)}
                    rows.append(row)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    print(f"{model} {rule} {lr:g}: warm-up {r['val_error']:.1f} vs {row['no_warmup_val_error']:.1f} "
                          f"(best without {min(grid_val):.1f})", flush=True)
                    (out / "warmup.md").write_text(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| model | rule | lr | val error, warm-up (%) | val error, none (%) | grid's best, none (%) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        value = f"{r['val_error']:.1f}" if r["status"] == "ok" else r["status"]
        lines.append(f"| {r['model']} | {r['rule']} | {r['lr']:g} | {value} | {r['no_warmup_val_error']:.1f} | "
                     f"{r['grid_best_val']:.1f} |")
    ok = [r for r in rows if r["status"] == "ok"]
    lines.append(f"\n{sum(r['val_error'] < r['no_warmup_val_error'] for r in ok)} of {len(ok)} finished runs lower "
                 "with warm-up. Per rule, warm-up minus none (points of validation error): mean, and the runs lower:")
    for rule in dict.fromkeys(r["rule"] for r in ok):
        diffs = [r["val_error"] - r["no_warmup_val_error"] for r in ok if r["rule"] == rule]
        lines.append(f"- {rule}: {sum(diffs) / len(diffs):+.1f} ({sum(d < 0 for d in diffs)} of {len(diffs)} lower)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
