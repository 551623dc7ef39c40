"""FDFA with Gaussian vs Rademacher tangents: validation error of short runs, same seeds, same everything else.

    PYTHONPATH=. python benchmarks/fdfa_tangent_dist.py      # writes benchmarks/results/fdfa_tangent_dist.{json,md}

Both distributions have E[u uᵀ] = I, so FDFA's feedback update B ← (1−λ)B + λ·mean(ẏ uᵀ) tracks the same Jacobian in
expectation; Rademacher entries are cheaper to draw and have lower fourth moment. Each run holds out the
validation examples (`--val-split`) from the training set; only the validation error is compared (no test error is
used to decide anything). One thread per run, one run at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

#: (model, data, extra flags): the dense fast path and the generic (any-model) path.
SETTINGS = [
    ("mlp", "mnist", ["--epochs", "3", "--lr", "3e-3", "--optimizer", "adam"]),
    ("cnn-small", "fashion-mnist", ["--epochs", "3", "--train-size", "20000", "--lr", "1e-3", "--optimizer", "adam",
                                    "--batch-size", "64"]),
]
DISTS = ("normal", "rademacher")


def run(model: str, data: str, flags: list[str], dist: str, seed: int, val: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "bpfree", "train", "--method", "fdfa", "--model", model, "--data", data,
               "--tangent-dist", dist, "--seed", str(seed), "--val-split", str(val), "--threads", "1",
               "--out", str(out), *flags]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ))
        last = (out / "metrics.jsonl").read_text().strip().splitlines()[-1]
        return float(json.loads(last)["val_error"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--val-split", type=int, default=10000)
    ap.add_argument("--out", default=str(RESULTS / "fdfa_tangent_dist.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict[str, list[float]]] = {}
    for model, data, flags in SETTINGS:
        key = f"{model} / {data}"
        results[key] = {}
        for dist in DISTS:
            results[key][dist] = [run(model, data, flags, dist, s, args.val_split) for s in seeds]
            print(f"{key} {dist}: {results[key][dist]}", flush=True)
    lines = ["| model / data | tangents | validation error % per seed | mean |", "|---|---|---|---:|"]
    for key, by_dist in results.items():
        for dist, errs in by_dist.items():
            lines.append(f"| {key} | {dist} | {', '.join(f'{e:.2f}' for e in errs)} | {statistics.mean(errs):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    meta = {"seeds": seeds, "val_split": args.val_split,
            "settings": {f"{m} / {d}": f for m, d, f in SETTINGS}}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
