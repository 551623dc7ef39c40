"""Adam or SGD for the per-rule defaults on unseen models: the oracle of benchmarks/lr_auto.py again with SGD
(momentum 0.9, cosine) on four learning rates, against Adam's six-point oracle, chosen on validation error.

    PYTHONPATH=. python benchmarks/lr_auto_sgd.py --models ResBNCNN,TinyMixer

Reuses lr_auto.py's run folders (runs/lr_auto/digits/grid) for Adam; writes OUT/sgd.jsonl and OUT/sgd.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lr_auto import GRID, RULES, run  # noqa: E402

SGD_GRID = (3e-3, 1e-2, 3e-2, 0.1)


def best(points: list[tuple[float, dict]]) -> tuple[float, dict]:
    return min(points, key=lambda p: (p[1]["val_error"], p[1]["val_loss"]))  # validation only


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="ResBNCNN,TinyMixer")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--out", default="benchmarks/results/lr_auto/digits")
    args = p.parse_args()
    root, out = Path("runs/lr_auto/digits"), Path(args.out)
    lines = ["| model | rule | Adam: best lr, val / test error (%) | SGD: best lr, val / test error (%) | "
             "lower validation error |", "|---|---|---|---|---|"]
    with open(out / "sgd.jsonl", "w") as log:
        for model in args.models.split(","):
            for rule in args.rules.split(","):
                base = ["train", "--method", rule, "--model", f"examples/lr_suite.py:{model}", "--data", "digits",
                        "--epochs", "40", "--batch-size", "32", "--val-split", "300", "--threads", "1"]
                adam = best([(lr, run(base + ["--lr", f"{lr:g}"], root / "grid" / model / rule / f"lr={lr:g}", 40))
                             for lr in GRID])
                sgd = best([(lr, run(base + ["--optimizer", "sgd", "--lr", f"{lr:g}"],
                                     root / "sgd" / model / rule / f"lr={lr:g}", 40)) for lr in SGD_GRID])
                row = {"model": model, "rule": rule, "adam_lr": adam[0], "adam_val": adam[1]["val_error"],
                       "adam_test": adam[1]["test_error"], "sgd_lr": sgd[0], "sgd_val": sgd[1]["val_error"],
                       "sgd_test": sgd[1]["test_error"]}
                log.write(json.dumps(row) + "\n")
                log.flush()
                winner = "Adam" if row["adam_val"] <= row["sgd_val"] else "SGD"
                lines.append(f"| {model} | {rule} | {adam[0]:g}: {row['adam_val']:.1f} / {row['adam_test']:.1f} | "
                             f"{sgd[0]:g}: {row['sgd_val']:.1f} / {row['sgd_test']:.1f} | {winner} |")
                (out / "sgd.md").write_text("\n".join(lines) + "\n")
                print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
