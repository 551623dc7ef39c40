"""Multi-tangent forward gradients (issue 16): step-time ratios from ONE process, interleaved rounds, medians.

    PYTHONPATH=. python benchmarks/multi_tangent_speed.py --threads 1 --rounds 30 \\
        --frog-path /tmp/frog --json benchmarks/results/forward_gradient/multi_tangent.json

Model: MLP 784-1024-1024-1024-10, batch 128 (random MNIST-shaped data), CPU. One step = what training does per
batch: `estimator.step(x, y)` (fills .grad) followed by an SGD step. lg-fg-a runs on LocalMixer M/1/16 (MNIST
shape, batch 128), the model it is defined for. Time is this process's CPU time (time.process_time): on a shared
machine wall time mostly measures how long other processes held the core. Every round runs every configuration
once, in an order rotated from round to round, so drift (caches, clock speed, neighbours' load) hits all alike;
the first two rounds are warm-up. Ratios use the medians.

"forward" is `model(x)` under no_grad. Extra cost per tangent = (step(K=16) - step(K=1)) / 15 / forward. Its
arithmetic floor counts the multiply-adds of the tangent matmuls per tangent over those of a forward pass:
fg-w: x V^T at every perturbed layer and (tangent in) x W^T at every layer after the first perturbed one;
fg-a: (tangent in) x W^T at every layer after the first perturbed one. Everything else (drawing tangents, the Gram
matrix, the estimate sum_k c_k v_k) is overhead above the floor.

The multi-tangent authors' code (Flügel et al. 2024, github.com/Helmholtz-AI-Energy/frog), when --frog-path (or
the FROG_PATH environment variable) points at a checkout of it, is timed on the same model, batch and thread
count, following its own training loop (nn_training/train.py: create_tangents, one forward-mode pass per
tangent, compute_gradients, optimizer step) with its default settings (normal tangents, one global tangent
split over the parameters); "own bp" for it is a plain autograd step of the same network. Its orthogonal
aggregation projects each parameter tensor separately; ours projects over all weights at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core import tangents as T
from bpfree.methods import build as build_method
from bpfree.models import build as build_model

HIDDEN = (1024, 1024, 1024)
BATCH = 128
K = 16
LR = 1e-6  # the SGD step runs (its cost is part of a training step) but barely moves the weights

TARGETS = {
    "fg-w K=16 mean / bp": ("<=", 12.0),
    "fg-w extra tangent / forward (mean)": ("<=", 2.0),
    "fg-w orthogonal / mean (K=16)": ("<=", 1.1),
    "fg-a extra tangent / forward (mean)": ("<=", 0.8),
    "fg-a orthogonal / mean (K=16)": ("<=", 1.1),
    "lg-fg-a orthogonal / mean (K=16)": ("<=", 1.1),
}


def floors(model: nn.Sequential) -> dict[str, float]:
    """Tangent matmul multiply-adds per tangent over a forward pass's, for fg-w and fg-a (exact readout)."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    fwd = sum(m.in_features * m.out_features for m in lins)
    perturbed = lins[:-1]  # the readout is trained on its exact gradient, not perturbed
    x_v = sum(m.in_features * m.out_features for m in perturbed)
    xdot_w = sum(m.in_features * m.out_features for m in lins[1:])  # the first layer's input has no tangent
    return {"fg-w": (x_v + xdot_w) / fwd, "fg-a": xdot_w / fwd}


def our_jobs(x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, Callable[[], None]], nn.Sequential]:
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 28, 28), hidden=HIDDEN)
    jobs: dict[str, Callable[[], None]] = {}

    def forward() -> None:
        with torch.no_grad():
            model(x)

    jobs["forward"] = forward

    def add(label: str, net: nn.Module, method: str, xx: torch.Tensor, yy: torch.Tensor, **options) -> None:
        est = build_method(method, net, seed=1, **options)
        opt = torch.optim.SGD(net.parameters(), lr=LR)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            est.step(xx, yy)
            opt.step()

        jobs[label] = step

    add("bp", model, "bp", x, y)
    for method in ("fg-w", "fg-a"):
        add(f"{method} K=1", model, method, x, y)
        for agg in ("mean", "orthogonal"):
            add(f"{method} K={K} {agg}", model, method, x, y, tangents=K, aggregation=agg)
    # The Gram matrix alone, over K tangents of every perturbed weight and bias (what orthogonal adds to the mean):
    # the sign-pattern histogram fg-w uses for Rademacher tangents, and the plain matmul route it replaces
    perturbed = [p for m in list(model)[:-1] if isinstance(m, nn.Linear) for p in m.parameters()]
    drawn = [T.sample((K, *p.shape), "rademacher", torch.Generator().manual_seed(0)) for p in perturbed]
    for label, kind in (("sign histogram", "sign"), ("float32 matmul", "integer")):
        jobs[f"Gram K={K}, {label}"] = lambda kind=kind: T.gram(drawn, entries=kind).sum().item() and None
    torch.manual_seed(0)
    mixer = build_model("localmixer-m1-16", 10, (1, 28, 28))
    for agg in ("mean", "orthogonal"):
        add(f"lg-fg-a K={K} {agg}", mixer, "lg-fg-a", x, y, tangents=K, aggregation=agg)
    return jobs, model


def frog_jobs(path: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The authors' training step on the same MLP, through their public API (imported from `path`)."""
    sys.path.insert(0, path)
    # nn_training/__init__ imports torchvision and einops; the wrapper module itself needs neither
    spec = importlib.util.spec_from_file_location("frog_fg_models", os.path.join(path, "nn_training", "fg_models.py"))
    assert spec is not None and spec.loader is not None
    fg_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fg_models)
    from torch.autograd import forward_ad as fwad

    def network() -> nn.Module:
        torch.manual_seed(0)
        widths = (784, *HIDDEN)
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        net = nn.Sequential(*layers, nn.Linear(widths[-1], 10))
        net.model_config = {"model__name": "fc"}  # the wrapper copies this into its own config
        return net

    jobs: dict[str, Callable[[], None]] = {}
    net = network()
    opt_bp = torch.optim.SGD(net.parameters(), lr=LR)

    def bp() -> None:
        opt_bp.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt_bp.step()

    jobs["frog bp"] = bp

    def add(label: str, k: int, aggregation: str) -> None:
        fgm = fg_models.WeightPerturbedForwardGradientModel(network(), aggregation_mode=aggregation, seed=0)
        opt = torch.optim.SGD(fgm.parameters(), lr=LR)

        def step() -> None:
            opt.zero_grad()
            tangents = fgm.create_tangents(k)
            jvps = []
            for i in range(k):
                with fwad.dual_level():
                    fgm.set_tangent(tangents, i)
                    jvps.append(fwad.unpack_dual(F.cross_entropy(fgm(x), y)).tangent)
            fgm.compute_gradients(torch.stack(jvps), tangents)
            opt.step()

        jobs[label] = step

    add("frog fg-w K=1", 1, "mean")
    add(f"frog fg-w K={K} mean", K, "mean")
    add(f"frog fg-w K={K} orthogonal", K, "orthogonal_projection")
    return jobs


def time_jobs(jobs: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """CPU milliseconds per call, `rounds` samples per job, order rotated every round (two warm-up rounds)."""
    names = list(jobs)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds + 2):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.process_time()
            jobs[name]()
            dt = (time.process_time() - t0) * 1e3
            if r >= 2:
                samples[name].append(dt)
    return samples


def ratios(ms: dict[str, float], fl: dict[str, float]) -> dict[str, float]:
    fwd, bp = ms["forward"], ms["bp"]
    out = {
        "fg-w K=1 / bp": ms["fg-w K=1"] / bp,
        "fg-w K=16 mean / bp": ms[f"fg-w K={K} mean"] / bp,
        "fg-w K=16 orthogonal / bp": ms[f"fg-w K={K} orthogonal"] / bp,
        "fg-w extra tangent / forward (mean)": (ms[f"fg-w K={K} mean"] - ms["fg-w K=1"]) / (K - 1) / fwd,
        "fg-w extra tangent / forward (orthogonal)": (ms[f"fg-w K={K} orthogonal"] - ms["fg-w K=1"]) / (K - 1) / fwd,
        "fg-w extra tangent floor (matmuls only)": fl["fg-w"],
        "fg-w orthogonal / mean (K=16)": ms[f"fg-w K={K} orthogonal"] / ms[f"fg-w K={K} mean"],
        "Gram K=16 over all weights / forward (sign histogram)": ms[f"Gram K={K}, sign histogram"] / fwd,
        "Gram K=16 over all weights / forward (float32 matmul)": ms[f"Gram K={K}, float32 matmul"] / fwd,
        "fg-a K=1 / bp": ms["fg-a K=1"] / bp,
        "fg-a K=16 mean / bp": ms[f"fg-a K={K} mean"] / bp,
        "fg-a extra tangent / forward (mean)": (ms[f"fg-a K={K} mean"] - ms["fg-a K=1"]) / (K - 1) / fwd,
        "fg-a extra tangent floor (matmuls only)": fl["fg-a"],
        "fg-a orthogonal / mean (K=16)": ms[f"fg-a K={K} orthogonal"] / ms[f"fg-a K={K} mean"],
        "lg-fg-a orthogonal / mean (K=16)": ms[f"lg-fg-a K={K} orthogonal"] / ms[f"lg-fg-a K={K} mean"],
    }
    if "frog bp" in ms:
        fbp = ms["frog bp"]
        out.update({
            "frog: fg-w K=1 / own bp": ms["frog fg-w K=1"] / fbp,
            "frog: fg-w K=16 mean / own bp": ms[f"frog fg-w K={K} mean"] / fbp,
            "frog: fg-w K=16 orthogonal / own bp": ms[f"frog fg-w K={K} orthogonal"] / fbp,
            "frog: fg-w extra tangent / forward (mean)": (ms[f"frog fg-w K={K} mean"] - ms["frog fg-w K=1"])
            / (K - 1) / fwd,
            "frog: fg-w extra tangent / forward (orthogonal)": (ms[f"frog fg-w K={K} orthogonal"]
                                                                 - ms["frog fg-w K=1"]) / (K - 1) / fwd,
            "frog: fg-w orthogonal / mean (K=16)": ms[f"frog fg-w K={K} orthogonal"] / ms[f"frog fg-w K={K} mean"],
            "bpfree fg-w K=16 mean / frog fg-w K=16 mean": ms[f"fg-w K={K} mean"] / ms[f"frog fg-w K={K} mean"],
        })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per configuration (medians reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--frog-path", default=os.environ.get("FROG_PATH"),
                    help="checkout of the authors' code (github.com/Helmholtz-AI-Energy/frog); default $FROG_PATH")
    ap.add_argument("--json", help="also write all numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        print("error: --rounds and --threads must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    jobs, model = our_jobs(x, y)
    frog = "not requested (--frog-path / FROG_PATH)"
    if args.frog_path:
        try:
            jobs.update(frog_jobs(args.frog_path, x, y))
            frog = f"timed from {args.frog_path}"
        except Exception as exc:  # any import or API mismatch: report and time ours alone
            frog = f"skipped, not importable from {args.frog_path}: {type(exc).__name__}: {exc}"
    print(f"torch {torch.__version__}, {args.threads} thread(s); MLP 784-{'-'.join(map(str, HIDDEN))}-10, "
          f"batch {BATCH}, SGD step included; {args.rounds} interleaved rounds, CPU ms per step")
    print(f"authors' code: {frog}")
    samples = time_jobs(jobs, args.rounds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"  {'':30s} {'median':>9s} {'min':>9s}")
    for k, v in samples.items():
        print(f"  {k:30s} {med[k]:7.1f} ms {min(v):7.1f} ms")
    r = ratios(med, floors(model))
    print("ratios (medians):")
    for k, v in r.items():
        target = TARGETS.get(k)
        note = ""
        if target:
            ok = v <= target[1]
            note = f"   target {target[0]} {target[1]:g}: {'met' if ok else 'NOT met'}"
        print(f"  {k:50s} {v:6.2f}{note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rounds": args.rounds, "frog": frog, "time_ms_median": med,
                       "time_ms_samples": samples, "ratios": r}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
