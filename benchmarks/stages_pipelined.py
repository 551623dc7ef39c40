"""Accuracy of the pipelined stages against the synchronous ones (`train --stages 2 --stage-mode ...`), for dfa and
fg-a, on MNIST and CIFAR-10, at the same budget and settings.

    BPFREE_DATA=/work/data PYTHONPATH=. python benchmarks/stages_pipelined.py

Synchronous stages are the one-process run (tests/test_stages.py); pipelined, stage 0 updates from the error of the
batch it ran one step before. Nothing is chosen here: every run uses the settings below (MNIST: the rules' validated
mlp recipes; CIFAR-10: Adam 1e-3 for both rules, the feedback-alignment benchmark nets' setting, not tuned), the
last epoch's validation error (a split held out of the training set) is reported beside its test error, once.
Writes a JSON file and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = {
    "mnist": ["--data", "mnist", "--model", "mlp", "--hidden", "256,256"],
    "cifar10": ["--data", "cifar10", "--model", "cnn-small", "--optimizer", "adam", "--lr", "1e-3",
                "--schedule", "constant"],
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", default="dfa,fg-a")
    p.add_argument("--data", default="mnist,cifar10")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--val-split", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stages" / "pipelined_accuracy.json"))
    return p.parse_args(argv)


def run(args: argparse.Namespace, data: str, rule: str, mode: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bpfree", "train", "--method", rule, *TASKS[data], "--stages", "2",
           "--stage-mode", mode, "--train-size", str(args.train_size), "--val-split", str(args.val_split),
           "--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"data": data, "rule": rule, "mode": mode, "exit": done.returncode, "error": done.stderr[-500:]}
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    config = json.loads((out / "config.json").read_text())
    return {"data": data, "rule": rule, "mode": mode, "stage_delays": config["stage_delays"],
            "val_error": last["val_error"], "test_error": last["test_error"], "train_loss": last["train_loss"],
            "seconds": last["seconds"], "lr": config["lr"], "optimizer": config["optimizer"]}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data.split(","):
            for rule in args.rules.split(","):
                for mode in ("synchronous", "pipelined"):
                    row = run(args, data, rule, mode, Path(tmp) / f"{data}-{rule}-{mode}")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {"train_size": args.train_size, "val_split": args.val_split, "epochs": args.epochs, "seed": args.seed,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| data | rule | mode | delays | val error (%) | test error (%) | train loss |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['data']} | {r['rule']} | {r['mode']} | failed (exit {r['exit']}) | | | |")
            continue
        lines.append(f"| {r['data']} | {r['rule']} | {r['mode']} | {r['stage_delays']} | {r['val_error']:.2f} | "
                     f"{r['test_error']:.2f} | {r['train_loss']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
