"""Activation memory of every rule against backprop, as the model gets deeper or wider.

For each model and rule: the activation memory of one training step, the part of its peak that grows with the
batch (`bpfree.core.memory`: CPU profiler accounting of every tensor allocation, exact and deterministic; on CUDA the
allocator's peak; the peak at 2 x batch less the peak at batch, each on the first step of a fresh estimator, so
buffers it keeps between steps count).
From the growth per block, the deepest plain conv net each rule could train in a memory budget at batch 256 (a
projection from the measured per-block cost, stated as such; weights and gradients not included).

    PYTHONPATH=. python benchmarks/activation_memory.py --threads 1 --out benchmarks/results/activation_memory
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bpfree import methods, models
from bpfree.core.memory import activation_peak

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from vit import ViT  # noqa: E402

RULES = [
    ("bp", {}), ("fa", {}), ("l-bp", {}), ("l-fa", {}), ("lg-bp", {}), ("lg-fa", {}), ("lg-fg-a", {}),
    ("lg-fg-w", {}), ("ff", {}), ("sff", {}), ("sff-block", {}), ("dfa", {}), ("dfa", {"recompute": True}),
    ("fdfa", {}), ("fdfa", {"recompute": True}), ("fg-w", {}), ("fg-a", {}), ("fg-a", {"recompute": True}),
]  # fmt: skip


def label(method: str, options: dict) -> str:
    return method + (" --recompute" if options.get("recompute") else "")


def plain_cnn(depth: int, channels: int = 64) -> nn.Module:
    """3x3 conv + ReLU, `channels` wide, `depth` deep, then pooled to a linear classifier."""
    layers = [nn.Sequential(nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1), nn.ReLU())
              for i in range(depth)]  # fmt: skip
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))
    net.input_shape = (3, 32, 32)
    return net


def model_grid(quick: bool, batch: int) -> list[tuple[str, str, int, object, int]]:
    """(family, setting, depth or width, builder, examples). resnet18's weights are large next to its activations
    at a small batch (its gradients would set the peak): it is measured at 4 x the batch."""
    depths = (4, 8) if quick else (4, 8, 16, 32)
    grid: list[tuple[str, str, int, object, int]] = [
        ("plain conv 64ch", f"depth {d}", d, lambda d=d: plain_cnn(d), batch) for d in depths]
    for w in (16,) if quick else (16, 64):
        grid.append(("resnet18", f"width {w}", w, lambda w=w: models.build("resnet18", num_classes=10,
                                                                            input_shape=(3, 32, 32), width=w),
                     4 * batch))  # fmt: skip
    for d in (4, 8) if quick else (4, 8, 16):
        grid.append(("ViT dim 64", f"{d} layers", d, lambda d=d: ViT(depth=d), batch))
    return grid


def measure(make, method: str, options: dict, batch: int, device: torch.device) -> float:  # noqa: ANN001
    """MiB that one step holds for `batch` examples: the peak at 2 x batch less the peak at batch, so parameter-sized
    memory (gradients, B matrices, tangent buffers) cancels and what is left grows with the batch: activations."""
    return step_peak(make, method, options, 2 * batch, device) - step_peak(make, method, options, batch, device)


def step_peak(make, method: str, options: dict, batch: int, device: torch.device) -> float:  # noqa: ANN001
    # Estimators from earlier measurements that sit in reference cycles (bound methods in their parts) would be freed
    # by the garbage collector at some point inside this step: frees of memory made before it, lowering its peak.
    gc.collect()
    torch.manual_seed(0)
    model = make().to(device)
    est = methods.build(method, model, seed=0, **options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *model.input_shape, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    # The first step: buffers an estimator keeps between steps (tangent buffers) count; anything batch-independent
    # made there (B matrices, gradients) cancels in `measure`.
    return activation_peak(lambda: est.step(x, y), device) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32, help="batch size of the measured step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--budget-gib", type=float, default=8.0, help="memory budget of the depth projection")
    ap.add_argument("--quick", action="store_true", help="small grid (a smoke test)")
    ap.add_argument("--rules", default=None,
                    help="measure only these rules (labels as in the table, comma-separated) and replace their rows "
                         "in OUT/memory.json")
    ap.add_argument("--families", default=None,
                    help="with --rules or alone: measure only these model families (plain, resnet18, ViT; "
                         "comma-separated) and replace their rows in OUT/memory.json")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/activation_memory"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    rules = None if args.rules is None else set(args.rules.split(","))
    families = None if args.families is None else tuple(args.families.split(","))

    def chosen(family: str, rule: str) -> bool:
        return (rules is None or rule in rules) and (families is None or family.startswith(families))

    partial = rules is not None or families is not None
    earlier = args.out / "memory.json"
    # --rules / --families replace those rows of an earlier table in --out; a new --out starts a table of them alone
    kept = json.loads(earlier.read_text())["rows"] if partial and earlier.exists() else []
    rows = [r for r in kept if not chosen(r["family"], r["rule"])]
    start = time.time()
    for family, setting, size, make, batch in model_grid(args.quick, args.batch):
        for method, options in RULES:
            if not chosen(family, label(method, options)):
                continue
            try:
                mib = measure(make, method, options, batch, device)
            except Exception as err:  # a rule that cannot run on a model is a table entry, not a crash
                print(f"{family} {setting} {label(method, options)}: {type(err).__name__}: {err}", file=sys.stderr)
                mib = None
            rows.append({"family": family, "setting": setting, "size": size, "rule": label(method, options),
                         "mib": mib, "examples": batch})  # fmt: skip
            print(f"{time.time() - start:6.0f}s {family:16s} {setting:10s} {label(method, options):16s} "
                  f"{'-' if mib is None else f'{mib:8.1f}'} MiB", flush=True)
    order = {label(m, o): i for i, (m, o) in enumerate(RULES)}
    families_order = {f: i for i, f in enumerate(dict.fromkeys(g[0] for g in model_grid(False, 1)))}
    rows.sort(key=lambda r: (families_order[r["family"]], r["size"], order[r["rule"]]))
    (args.out / "memory.json").write_text(json.dumps({"batch": args.batch, "device": str(device), "rows": rows},
                                                     indent=1))  # fmt: skip
    (args.out / "memory.md").write_text(report(rows, args.batch, args.budget_gib))
    print(report(rows, args.batch, args.budget_gib))


def report(rows: list[dict], batch: int, budget_gib: float) -> str:
    """Per family: MiB per setting and x bp at the largest setting; for the plain net the depth projection."""
    out = ["Activation memory of one step, MiB for N examples (the peak at 2N examples less the peak at N); last "
           "column: x bp at the largest setting.", ""]
    families = list(dict.fromkeys(r["family"] for r in rows))
    for family in families:
        sub = [r for r in rows if r["family"] == family]
        settings = list(dict.fromkeys(r["setting"] for r in sub))
        rules = list(dict.fromkeys(r["rule"] for r in sub))
        value = {(r["rule"], r["setting"]): r["mib"] for r in sub}
        out += [f"### {family} (N = {sub[0].get('examples', batch)})", "",
                "| rule | " + " | ".join(settings) + " | × bp |",
                "|---|" + "---|" * (len(settings) + 1)]
        bp_last = value.get(("bp", settings[-1]))
        for rule in rules:
            cells = [("—" if value[rule, s] is None else f"{value[rule, s]:.1f}") for s in settings]
            last = value[rule, settings[-1]]
            ratio = "—" if last is None or not bp_last else f"{last / bp_last:.2f}"
            out.append(f"| {rule} | " + " | ".join(cells) + f" | {ratio} |")
        out.append("")
        if family.startswith("plain"):
            out += projection(sub, rules, batch, budget_gib)
    return "\n".join(out)


def projection(sub: list[dict], rules: list[str], batch: int, budget_gib: float) -> list[str]:
    """The deepest plain net within the budget at batch 256: a line through the two deepest measurements, scaled
    from the measured batch (activations are linear in the batch)."""
    lines = [f"Deepest plain conv net (64 ch, 32x32) whose activations fit in {budget_gib:g} GiB at batch 256, "
             f"projected from the two deepest measurements ({batch} examples):", "",
             "| rule | MiB per block | deepest |", "|---|---|---|"]  # fmt: skip
    reference = 0.0
    for rule in rules:
        pts = sorted((r["size"], r["mib"]) for r in sub if r["rule"] == rule and r["mib"] is not None)
        if len(pts) < 2:
            continue
        (d0, m0), (d1, m1) = pts[-2], pts[-1]
        scale = 256 / batch  # activations are linear in the batch
        per_block = (m1 - m0) / (d1 - d0) * scale
        fixed = m0 * scale - per_block * d0
        reference = reference or per_block  # bp's, the first rule: smaller than 5 % of it is noise
        budget = budget_gib * 1024
        flat = per_block < 0.05 * reference if reference else per_block <= 0
        deepest = "no limit (flat)" if flat else f"{max(0, int((budget - fixed) / per_block))}"
        if fixed > budget:
            deepest = "none"
        lines.append(f"| {rule} | {per_block:.1f} | {deepest} |")
    return lines + [""]


if __name__ == "__main__":
    main()
