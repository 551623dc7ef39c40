"""Speed of the learning rules on models they reach through the anatomy (issue 14), as ratios to bp.

    PYTHONPATH=. python benchmarks/anatomy_speed.py            # full: resnet18 + ViT, 7 rounds
    PYTHONPATH=. python benchmarks/anatomy_speed.py --quick    # smoke test: small batch, 2 rounds

One "step" is what the trainer calls: `estimator.step(x, y)` (fills .grad; no optimizer), on random CIFAR-shaped
data (3x32x32, 10 classes) in training mode. Time is this process's CPU time (time.process_time), one thread: on a
shared machine wall time mostly measures other processes. Every round runs every rule once, in turn (interleaved),
after two warm-up rounds; a rule's time is its median over the rounds and its ratio is that over bp's median, all
in the same process.

Models:
- resnet18 (`bpfree.models.resnet`), width 32, batch 128: its nine declared blocks are the DFA/FDFA boundaries.
- vit: a small Vision Transformer for CIFAR built from nn.TransformerEncoder, as a user would write it: 4x4 patches
  (64 tokens), width 128, 4 encoder layers of 4 heads, MLP 256, a learned position embedding, mean-pooled tokens,
  LayerNorm, linear head; batch 128.
A rule that does not run on a model gets a row saying why.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from bpfree.core.errors import UsageError
from bpfree.core.memory import keep_cpu_heap
from bpfree.methods import build as build_method
from bpfree.models import build as build_model

RESULTS = Path(__file__).parent / "results"

#: (model, rule, target ratio to bp or None)
ROWS: list[tuple[str, str, float | None]] = [
    ("resnet18", "fa", 1.15),
    ("resnet18", "dfa", 1.0),
    ("resnet18", "fdfa", 1.3),
    ("resnet18", "fdfa --tangent-dist normal", None),
    ("resnet18", "fg-a", 2.0),
    ("resnet18", "dfa --recompute true", None),
    ("resnet18", "fdfa --recompute true", None),
    ("resnet18", "fg-a --recompute true", None),
    ("resnet18", "lg-fg-a", None),
    ("resnet18", "sff-block", 1.1),
    ("resnet18", "l-bp", 1.1),
    ("vit", "fa", None),
    ("vit", "dfa", None),
    ("vit", "fdfa", None),
    ("vit", "fg-a", 2.5),
]


class ViT(nn.Module):
    """A small ViT for 32x32 images: patch embedding, position embedding, nn.TransformerEncoder, mean pool, head."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), dim: int = 128,
                 depth: int = 4, heads: int = 4, mlp: int = 256, patch: int = 4):  # fmt: skip
        super().__init__()
        self.patch = nn.Conv2d(input_shape[0], dim, patch, patch)
        tokens = (input_shape[1] // patch) * (input_shape[2] // patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(t)).mean(1))


def make_model(name: str, width: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        return build_model("resnet18", 10, (3, 32, 32), width=width)
    return ViT()


def time_model(model_name: str, rules: list[str], batch: int, rounds: int, width: int) -> dict[str, dict]:
    model = make_model(model_name, width).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    ests, skipped = {}, {}
    for rule in ["bp", *rules]:
        name, *flags = rule.split(" ")
        options = {flags[i].lstrip("-").replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
        try:
            ests[rule] = build_method(name, model, seed=1, **options)
        except UsageError as e:
            skipped[rule] = str(e)
    samples: dict[str, list[float]] = {r: [] for r in ests}
    faults: dict[str, list[int]] = {r: [] for r in ests}
    for r in range(rounds + 2):
        for rule, est in ests.items():
            model.zero_grad(set_to_none=True)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.process_time()
            est.step(x, y)
            if r >= 2:  # the first two rounds warm up caches and lazy initialisation (feedback matrices, probes)
                samples[rule].append(time.process_time() - t0)
                faults[rule].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(f"  {model_name} round {r + 1}/{rounds + 2} done", flush=True)
    bp = statistics.median(samples["bp"])
    out = {rule: {"ms": 1e3 * statistics.median(s), "ratio": statistics.median(s) / bp,
                  "samples_ms": [1e3 * t for t in s], "page_faults": int(statistics.median(faults[rule]))}
           for rule, s in samples.items()}  # fmt: skip
    out.update({rule: {"skipped": why} for rule, why in skipped.items()})
    return out


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| model | rule | ms / step | ratio to bp | target | met | page faults / step |",
             "|---|---|---:|---:|---:|---|---:|"]
    for model, res in results.items():
        lines.append(f"| {model} | bp | {res['bp']['ms']:.0f} | 1.00 | | | {res['bp'].get('page_faults', '')} |")
        for m, rule, target in ROWS:
            if m != model or rule not in res:
                continue
            r = res[rule]
            if "skipped" in r:
                lines.append(f"| {model} | {rule} | does not run: {r['skipped']} | | {target or ''} | | |")
                continue
            met = "" if target is None else ("yes" if r["ratio"] <= target else "NO")
            tgt = "" if target is None else f"≤ {target:.2f}"
            lines.append(f"| {model} | {rule} | {r['ms']:.0f} | {r['ratio']:.2f} | {tgt} | {met} | "
                         f"{r.get('page_faults', '')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 16, 2 rounds: checks that everything runs")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=32, help="resnet18 width")
    ap.add_argument("--models", default="resnet18,vit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "anatomy_speed.json"))
    ap.add_argument("--heap", choices=("kept", "default"), default="kept",
                    help="kept: glibc keeps freed memory, as `bpfree` sets it (core.memory.keep_cpu_heap); default: "
                    "glibc's own trimming")
    args = ap.parse_args()
    kept = args.heap == "kept" and keep_cpu_heap()
    torch.set_num_threads(args.threads)
    batch, rounds = (16, 2) if args.quick else (args.batch, args.rounds)
    results = {}
    for model in args.models.split(","):
        rules = [rule for m, rule, _ in ROWS if m == model]
        results[model] = time_model(model, rules, batch, rounds, args.width)
    text = table(results)
    print(text, end="")
    if not args.quick:
        meta = {"batch": batch, "rounds": rounds, "resnet18_width": args.width, "threads": args.threads,
                "heap_kept": kept, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "time": "CPU time of this process (time.process_time), medians over interleaved rounds"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
