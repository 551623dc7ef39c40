"""Step time of the rules that push tangents through attention, with the lean attention path and without it (the
math kernel, as before it), as ratios to bp, all in one process.

    PYTHONPATH=. python benchmarks/lean_attention_speed.py --threads 1

One step is `estimator.step(x, y)` on random CIFAR-shaped data, in training mode; time is this process's CPU time
(time.process_time). Every round runs every (rule, path) once, in turn, after two warm-up rounds; a figure is the
median over the rounds divided by bp's median. "math" disables `lean_attention` for the whole step (what the rules
ran before it existed); "lean" is the default.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

import bpfree.core.forward_mode as forward_mode
import bpfree.methods.block_local as block_local
from bpfree import methods

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from anatomy_speed import ViT as SpeedViT  # noqa: E402
from vit import ViT  # noqa: E402

RULES = ["lg-fg-a", "lg-fg-w", "fdfa", "fg-w", "fg-a", "fg-a --recompute true", "dfa"]
MODELS = {
    # the ViT of benchmarks/anatomy_speed.py (dim 128, 4 layers, 4 heads) and of docs/memory.md (dim 64, 16 layers)
    "speed-vit": lambda: SpeedViT(),
    "memory-vit": lambda: ViT(depth=16),
}


@contextlib.contextmanager
def attention_path(lean: bool):  # noqa: ANN201
    """The default (lean) path, or none: every forward-mode pass then runs PyTorch's math kernel."""
    if lean:
        yield
        return
    saved = forward_mode.lean_attention, block_local.lean_attention
    forward_mode.lean_attention = block_local.lean_attention = contextlib.nullcontext
    try:
        yield
    finally:
        forward_mode.lean_attention, block_local.lean_attention = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="speed-vit")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated, flags as on the command line")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MODELS[args.model]().train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    runs = {("bp", True): methods.build("bp", model, seed=1)}
    for rule in args.rules.split(","):
        name, *flags = rule.split(" ")
        options = {flags[i].lstrip("-").replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
        for lean in (False, True):
            runs[rule, lean] = methods.build(name, model, seed=1, **options)
    samples: dict[tuple[str, bool], list[float]] = {key: [] for key in runs}
    for r in range(args.rounds + 2):
        for (rule, lean), est in runs.items():
            model.zero_grad(set_to_none=True)
            with attention_path(lean):
                start = time.process_time()
                est.step(x, y)
                spent = time.process_time() - start
            if r >= 2:  # warm-up: caches, lazy initialisation
                samples[rule, lean].append(spent)
    bp = statistics.median(samples["bp", True])
    print(f"{args.model}, batch {args.batch}, {args.rounds} rounds, bp {1e3 * bp:.0f} ms / step (CPU time)")
    print("| rule | math kernel × bp | lean × bp | lean / math |")
    print("|---|---:|---:|---:|")
    for rule in args.rules.split(","):
        math, lean = (statistics.median(samples[rule, flag]) for flag in (False, True))
        print(f"| {rule} | {math / bp:.2f} | {lean / bp:.2f} | {lean / math:.3f} |")


if __name__ == "__main__":
    main()
