"""Reproduce Ren et al. 2022 (Table 3) rows with LocalMixer, and time LG-FG-A against BP.

Suites (each method trained with the ordinary trainer, `bpfree.training.train`, so every number has a CLI equivalent):
  mnist-m    MNIST, localmixer-m1-16: bp, l-bp, lg-bp, fg-w, fg-a, lg-fg-w, lg-fg-a
  mnist-s    MNIST, localmixer-s1-1: bp, fg-a (lg-* equal the non-LG methods with one patch and one group)
  cifar      CIFAR-10, localmixer-m8-16: bp, l-bp, lg-bp, fg-w, fg-a, lg-fg-w, lg-fg-a at one epoch budget
  speed      step time of lg-fg-a vs bp on localmixer-m8-16 (CIFAR-shaped batches), interleaved in one process;
             --model / --methods choose others (`fg-a:generic` = fg-a without its LocalMixer path)

Example (what fits this 2-core machine):  python benchmarks/localmixer.py --suite speed
    python benchmarks/localmixer.py --suite mnist-m --train-size 5000 --epochs 1
Results are appended as JSON lines to benchmarks/results/localmixer.jsonl and printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bpfree import methods, models
from bpfree.training.train import TrainConfig, train

PAPER = {  # test error %, Table 3 of the paper (submission version)
    "mnist-m": {"bp": 2.41, "l-bp": 2.16, "lg-bp": 2.81, "fg-w": 8.56, "fg-a": 3.76, "lg-fg-w": 5.66, "lg-fg-a": 2.55},
    "mnist-s": {"bp": 2.66, "fg-a": 3.24},
    "cifar": {
        "bp": 33.62,
        "l-bp": 30.75,
        "lg-bp": 33.84,
        "fg-w": 55.95,
        "fg-a": 59.72,
        "lg-fg-w": 52.70,
        "lg-fg-a": 30.68,
    },
}
SUITES = {
    "mnist-m": ("mnist", "localmixer-m1-16"),
    "mnist-s": ("mnist", "localmixer-s1-1"),
    "cifar": ("cifar10", "localmixer-m8-16"),
}
# Learning rates (SGD, momentum 0.9): chosen, not from the paper (MNIST/CIFAR settings are unpublished).
LR = {"bp": 0.05, "l-bp": 0.05, "lg-bp": 0.05, "fg-w": 1e-4, "fg-a": 0.01, "lg-fg-w": 1e-3, "lg-fg-a": 0.01}


def run_suite(args: argparse.Namespace) -> list[dict]:
    data, model = SUITES[args.suite]
    rows = []
    for method in args.methods or PAPER[args.suite]:
        if method not in methods.METHODS.entries:
            print(f"skipping {method}: not registered on this branch", file=sys.stderr)
            continue
        lr = args.lr if args.lr is not None else LR[method]
        cfg = TrainConfig(
            method=method,
            model=model,
            data=data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=lr,
            schedule="cosine",
            train_size=args.train_size,
            data_root=args.data_root,
            seed=args.seed,
            out=f"{args.out}/{args.suite}-{method}",
        )
        t0 = time.perf_counter()
        metrics = train(cfg, log_epochs=True)
        last = metrics[-1]
        command = (
            f"bpfree train --method {method} --model {model} --data {data} --epochs {args.epochs} "
            f"--batch-size {args.batch_size} --lr {lr} --schedule cosine"
            + (f" --train-size {args.train_size}" if args.train_size else "")
        )
        rows.append(
            {
                "suite": args.suite,
                "method": method,
                "test_error": last["test_error"],
                "train_error": last["train_error"],
                "paper": PAPER[args.suite].get(method),
                "seconds": round(time.perf_counter() - t0, 1),
                "command": command,
            }
        )
    return rows


def time_steps(args: argparse.Namespace) -> list[dict]:
    """Seconds per training step (estimator step + SGD step), interleaved rounds, median; ratios to bp.

    A method written `NAME:generic` (e.g. `fg-a:generic`) runs with its model-specific path switched off: the
    generic forward-mode path, for comparison with the LocalMixer path in the same process.
    """
    torch.manual_seed(0)
    model_name = args.model or "localmixer-m8-16"
    shape = models.MODELS.get(model_name).extra["input_shape"]
    x = torch.randn(args.batch_size, *shape)
    y = torch.randint(0, 10, (args.batch_size,))
    ests = {}
    for name in ["bp", *[m for m in (args.methods or ["l-bp", "lg-fg-a"]) if m != "bp"]]:
        model = models.build(model_name, 10, shape)
        with torch.no_grad():  # a non-zero readout, so that forward gradients have something to carry
            model.readout.weight.normal_(0, 0.01)
        base = name.split(":")[0]
        if name.endswith(":generic"):  # the registered generic rule, not the LocalMixer fast path
            est = methods.METHODS.get(base).factory(model, seed=0, **methods.METHODS.resolve_options(base, {}))
        else:
            est = methods.build(base, model)
        ests[name] = (est, torch.optim.SGD(est.trainable(), lr=1e-3, momentum=0.9))
    times: dict[str, list[float]] = {k: [] for k in ests}
    for _ in range(args.rounds):
        for name, (est, opt) in ests.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                est.step(x, y)
                opt.step()
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [
        {
            "suite": "speed",
            "method": k,
            "seconds_per_step": round(v, 4),
            "ratio_to_bp": round(v / med["bp"], 3),
            "model": model_name,
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
        }
        for k, v in med.items()
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=[*SUITES, "speed"], default="speed")
    p.add_argument("--methods", nargs="*", help="subset of the suite's methods (speed: methods to time against bp)")
    p.add_argument("--model", default=None, help="speed: the model (default localmixer-m8-16)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-size", type=int, default=None, help="first N training examples (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="override every method's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="runs/localmixer-bench")
    p.add_argument("--steps", type=int, default=5, help="speed: steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="speed: interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a busy machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = time_steps(args) if args.suite == "speed" else run_suite(args)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    with open(results / "localmixer.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({**r, "argv": sys.argv[1:]}) + "\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
