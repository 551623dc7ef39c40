"""Where a rule's step time goes: CPU time and minor page faults per ATen operator, rules side by side.

    PYTHONPATH=. python benchmarks/step_ops.py --rules bp,dfa,fdfa          # resnet18 width 32, batch 128
    PYTHONPATH=. python benchmarks/step_ops.py --rules bp,fg-a --model vit  # anatomy_speed.py's ViT
    MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_MMAP_THRESHOLD_=33554432 PYTHONPATH=. python benchmarks/step_ops.py

Every rule's estimator lives on one model in this process, as in `benchmarks/anatomy_speed.py`; after two warm-up
rounds each measured step runs under a dispatch mode that reads this thread's CPU time and the process's minor page
faults around every operator (tangent arithmetic included: forward-mode rules reach the dispatcher as ATen
operators). The mode adds a few microseconds per operator; the step total beside it is measured in the same run.
The glibc variables in the second line stop the C allocator from giving the heap back between steps: no page faults.
"""

from __future__ import annotations

import argparse
import collections
import resource
import time
from typing import Any

import torch
from anatomy_speed import make_model
from torch.utils._python_dispatch import TorchDispatchMode

from bpfree.methods import build as build_method


class OperatorClock(TorchDispatchMode):
    """CPU seconds, calls and minor page faults per operator while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        name = str(func).removeprefix("aten.").removesuffix(".default")
        self.seconds[name] += time.thread_time() - start
        self.calls[name] += 1
        self.faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default="bp,dfa,fdfa", help="comma-separated methods (bp first: the ratios' base)")
    ap.add_argument("--model", choices=("resnet18", "vit"), default="resnet18",
                    help="resnet18 or benchmarks/anatomy_speed.py's ViT")
    ap.add_argument("--width", type=int, default=32, help="resnet18 width")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per rule (after two warm-up rounds)")
    ap.add_argument("--top", type=int, default=16, help="operators shown")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = make_model(args.model, args.width).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    rules = args.rules.split(",")
    estimators = {rule: build_method(rule, model, seed=1) for rule in rules}
    clocks = {rule: OperatorClock() for rule in rules}
    totals: collections.Counter[str] = collections.Counter()
    for round_ in range(2 + args.steps):
        for rule, est in estimators.items():
            model.zero_grad(set_to_none=True)
            if round_ < 2:
                with OperatorClock():  # the mode's first use costs a one-off setup: not in a measured step
                    est.step(x, y)
                continue
            start = time.thread_time()
            with clocks[rule]:
                est.step(x, y)
            totals[rule] += time.thread_time() - start
    per_step = {rule: 1e3 * totals[rule] / args.steps for rule in rules}
    base = per_step[rules[0]]
    print("ms per step (× " + rules[0] + "): " + ", ".join(f"{r} {ms:.0f} ({ms / base:.2f})"
                                                            for r, ms in per_step.items()))  # fmt: skip
    print("outside operators (Python, autograd engine), ms: " + ", ".join(
        f"{r} {per_step[r] - 1e3 * sum(clocks[r].seconds.values()) / args.steps:.0f}" for r in rules))
    names = set().union(*(c.seconds for c in clocks.values()))
    order = sorted(names, key=lambda n: -max(c.seconds[n] for c in clocks.values()))
    print("\n| operator | " + " | ".join(f"{r}: ms, calls, faults" for r in rules) + " |")
    print("|---|" + "---|" * len(rules))
    for name in order[: args.top]:
        cells = [f"{1e3 * clocks[r].seconds[name] / args.steps:.1f}, {clocks[r].calls[name] // args.steps}, "
                 f"{clocks[r].faults[name] // args.steps}" for r in rules]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
