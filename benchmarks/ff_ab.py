"""ff's step time at a git revision and in the working tree, interleaved in one process, as ratios to bp.

    PYTHONPATH=. python benchmarks/ff_ab.py --rev f628d11      # plain conv net, depth 8, batch 64, 5 rounds

The revision's `bpfree/methods/forward_forward.py` is loaded beside the working tree's (its registration skipped);
both estimators and bp step on one model in turn, after two warm-up rounds; CPU time of this process.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

import bpfree.methods as methods
from bpfree.methods import build as build_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
from activation_memory import plain_cnn  # noqa: E402


def module_at(rev: str) -> types.ModuleType:
    """`bpfree.methods.forward_forward` as it was at `rev`, without registering its methods again."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.check_output(["git", "-C", str(root), "show", f"{rev}:bpfree/methods/forward_forward.py"])
    register = methods.METHODS.register
    methods.METHODS.register = lambda *a, **k: (lambda cls: cls)  # type: ignore[method-assign]
    try:
        module = types.ModuleType(f"forward_forward_{rev}")
        exec(compile(source.decode(), module.__name__, "exec"), module.__dict__)  # noqa: S102
    finally:
        methods.METHODS.register = register  # type: ignore[method-assign]
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="f628d11", help="git revision of the 'before' estimator")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = module_at(args.rev)
    torch.manual_seed(0)
    model = plain_cnn(args.depth)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *model.input_shape, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    new = build_method("ff", model, seed=1)
    estimators = {"bp": build_method("bp", model, seed=1),
                  f"ff at {args.rev}": old.BlockForwardForward(model, seed=1, **new.options),
                  "ff now": new}  # fmt: skip
    samples: dict[str, list[float]] = {k: [] for k in estimators}
    for round_ in range(args.rounds + 2):
        for name, est in estimators.items():
            model.zero_grad(set_to_none=True)
            start = time.process_time()
            est.step(x, y)
            if round_ >= 2:
                samples[name].append(time.process_time() - start)
    bp = statistics.median(samples["bp"])
    for name, s in samples.items():
        print(f"{name:16s} {1e3 * statistics.median(s):7.0f} ms  × bp {statistics.median(s) / bp:.2f}")


if __name__ == "__main__":
    main()
