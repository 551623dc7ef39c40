"""Feedback-alignment family benchmark: (a) step time vs bp, (b) accuracy at equal epochs, (c) alignment.

  (a) speed     fc-bn (2 x 800, batch 64): median step time of fa / dfa / fdfa over bp, all timed in the same run,
                interleaved round by round, as thread CPU time (steady on a shared machine) and wall time.
  (b) accuracy  MNIST and CIFAR-10, fc-bn and cnn-small; bp, fa, dfa, fdfa (and fg-w if registered) at equal
                epochs, Adam, same seed and batches for every method.
  (c) alignment during the (b) runs: every --align-every steps, the angle between each method's update (.grad) of
                each hidden weight layer and the exact gradient on the same batch; written to JSON and plotted.

    PYTHONPATH=. python benchmarks/feedback_alignment.py speed
    PYTHONPATH=. python benchmarks/feedback_alignment.py accuracy --datasets mnist cifar10 --epochs 2 \
        --train-size 10000
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bpfree import methods, models
from bpfree.core import tangents as T

RESULTS = Path(__file__).parent / "results"


# ------------------------------------------------------------------------------------------------------ speed


def step_macs(layers: int, batch: int, inp: int = 784, width: int = 800, classes: int = 10) -> dict[str, int]:
    """Multiply-accumulates of one step on fc-bn (matmuls only): the floor of each rule's cost ratio to bp.

    bp: forward, one weight gradient per layer, input gradients of every layer but the first. dfa: forward, weight
    gradients, e·B_l for every hidden layer. fdfa: the forward carries a tangent through every layer after the
    first (its input has none), plus dfa's backward and the feedback update ẏᵀu_l."""
    n, hid = batch, layers * width
    fwd = n * inp * width + (layers - 1) * n * width * width + n * width * classes
    grads_w = fwd
    grads_in = (layers - 1) * n * width * width + n * width * classes
    tangent = (layers - 1) * n * width * width + n * width * classes
    signals = n * classes * hid
    return {"bp": fwd + grads_w + grads_in, "dfa": fwd + grads_w + signals,
            "fdfa": fwd + tangent + grads_w + signals + classes * n * hid}  # fmt: skip


def kernel_ms(batch: int, rounds: int = 60) -> dict[str, float]:
    """Isolated one-thread times of the step's big kernels (fc-bn 2x800): what the ratios are made of."""
    n, g = batch, torch.Generator().manual_seed(0)
    x, h, w1, w2 = torch.randn(n, 784), torch.randn(n, 800), torch.randn(800, 784), torch.randn(800, 800)
    d, both = torch.randn(n, 800), torch.randn(2 * n, 800)
    ops = {
        "forward x W1^T": lambda: x @ w1.t(),
        "forward h W2^T": lambda: h @ w2.t(),
        "forward [h; h_dot] W2^T (fdfa, 2N rows)": lambda: both @ w2.t(),
        "weight grad d^T x (layer 1)": lambda: d.t() @ x,
        "weight grad d^T h (layer 2)": lambda: d.t() @ h,
        "input grad d W2 (bp only)": lambda: d @ w2,
        "two N x 800 normal tangents": lambda: (torch.randn(n, 800, generator=g), torch.randn(n, 800, generator=g)),
        "two N x 800 rademacher tangents": lambda: T.sample((2, n, 800), "rademacher", g),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(rounds):
        for k, f in ops.items():
            c = time.thread_time()
            f()
            times[k].append(time.thread_time() - c)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def speed(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    shape = (1, 28, 28)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch, *shape, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    variants: dict[str, methods.Estimator] = {}
    names = ["bp", "fa", "dfa", "fdfa", "fdfa rademacher", "dfa (autograd path)", "fdfa (autograd path)"]
    for name in names:
        torch.manual_seed(0)
        net = models.build("fc-bn", 10, shape, layers=args.layers).train()
        opts = {"tangent_dist": "rademacher"} if "rademacher" in name else {}
        est = methods.build(name.split()[0], net, seed=0, **opts)
        if "autograd" in name:
            est.fast = None  # the generic path, for comparison with the hand-written formulas
        variants[name] = est
    wall: dict[str, list[float]] = {n: [] for n in variants}
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(args.warmup + args.rounds):
        for name, est in variants.items():  # interleaved: load spikes hit every method alike
            t, c = time.perf_counter(), time.thread_time()
            est.step(x, y)
            if r >= args.warmup:
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.thread_time() - c)
    # The machine is shared: wall time includes waiting for a core. With one torch thread all work runs on this
    # thread, so its CPU time (time.thread_time) is the steadier measure of a step's own cost; wall is beside it.
    out: dict[str, Any] = {
        "setup": f"fc-bn {args.layers}x800, batch {args.batch}, {args.threads} thread(s), "
        f"median of {args.rounds} interleaved rounds",
    }
    for label, times in [("cpu", cpu), ("wall", wall)]:
        med = {n: statistics.median(t) for n, t in times.items()}
        out[f"{label}_ms"] = {n: 1e3 * v for n, v in med.items()}
        out[f"{label}_ratio_to_bp"] = {n: v / med["bp"] for n, v in med.items()}
    macs = step_macs(args.layers, args.batch)
    out["macs"] = macs
    out["macs_ratio_to_bp"] = {n: v / macs["bp"] for n, v in macs.items()}
    out["kernel_ms"] = kernel_ms(args.batch) if args.layers == 2 else {}
    print(out["setup"])
    for k, v in out["kernel_ms"].items():
        print(f"  kernel {k:42s} {v:6.2f} ms")
    print("  matmul multiply-accumulates per step: " + ", ".join(
        f"{n} {v / 1e6:.1f}M ({v / macs['bp']:.3f}x)" for n, v in macs.items()))  # fmt: skip
    print(f"  {'':22s} {'cpu ms':>8s} {'ratio':>6s} {'wall ms':>8s} {'ratio':>6s}")
    for n in variants:
        print(f"  {n:22s} {out['cpu_ms'][n]:8.2f} {out['cpu_ratio_to_bp'][n]:6.2f} "
              f"{out['wall_ms'][n]:8.2f} {out['wall_ratio_to_bp'][n]:6.2f}")
    return out


# --------------------------------------------------------------------------------------------------- accuracy


def hidden_weights(net: nn.Module) -> list[nn.Parameter]:
    """Weights of the hidden Linear/Conv2d layers (all but the last weight layer)."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [m.weight for m in layers[:-1]]


def exact_grads(net: nn.Module, x: torch.Tensor, y: torch.Tensor, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Backprop gradient on the batch, leaving BatchNorm running statistics untouched."""
    buffers = [b.clone() for b in net.buffers()]
    grads = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    with torch.no_grad():
        for b, s in zip(net.buffers(), buffers):
            b.copy_(s)
    return list(grads)


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = F.cosine_similarity(a.flatten(), b.flatten(), dim=0).clamp(-1, 1).item()
    return math.degrees(math.acos(cos))


def evaluate(est: methods.Estimator, data: Any, batch: int) -> float:
    est.model.eval()
    wrong = total = 0
    for x, y in data.test_batches(batch):
        wrong += (est.predict(x).argmax(1) != y).sum().item()
        total += len(y)
    return 100.0 * wrong / total


def run_one(data: Any, model: str, method: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    net = models.build(model, data.num_classes, data.input_shape)
    est = methods.build(method, net, seed=args.seed)
    opt = torch.optim.Adam(est.trainable(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)  # same batches for every method
    hidden = hidden_weights(net)
    align: list[dict[str, Any]] = []
    step, t0 = 0, time.perf_counter()
    for _ in range(args.epochs):
        net.train()
        for x, y in data.train_batches(args.batch, gen):
            measure = method != "bp" and step % args.align_every == 0
            if measure:
                ref = exact_grads(net, x, y, hidden)
            opt.zero_grad(set_to_none=True)
            r = est.step(x, y)
            if measure:
                align.append({"step": step, "deg": [angle(p.grad, g) for p, g in zip(hidden, ref)]})
            opt.step()
            if not torch.isfinite(r.loss):
                raise RuntimeError(f"{method} on {model} diverged at step {step}")
            step += 1
    err = evaluate(est, data, 1000)
    res = {"model": model, "method": method, "test_error": err, "steps": step,
           "seconds": time.perf_counter() - t0, "alignment": align}  # fmt: skip
    print(f"  {data.name:8s} {model:10s} {method:5s} test error {err:6.2f} %  ({res['seconds']:.0f} s)", flush=True)
    return res


def accuracy(args: argparse.Namespace, out_path: Path) -> dict[str, Any]:
    from bpfree.data import load  # the lead's loader (bpfree/data)

    torch.set_num_threads(args.threads)
    meths = [m for m in args.methods if m in methods.METHODS.entries]
    skipped = sorted(set(args.methods) - set(meths))
    if skipped:
        print(f"not registered on this branch, skipped: {', '.join(skipped)}")
    out: dict[str, Any] = {"setup": vars(args) | {"methods_run": meths, "skipped": skipped}, "runs": []}
    for ds in args.datasets:
        data = load(ds, root=args.data_root, train_size=args.train_size)
        for model in args.models:
            for method in meths:
                out["runs"].append({"dataset": ds, **run_one(data, model, method, args)})
                out_path.write_text(json.dumps(out, indent=1))  # partial results survive an interrupted run
    return out


def plot_alignment(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], r["model"]) for r in result["runs"] if r["alignment"]})
    nlayers = max(len(r["alignment"][0]["deg"]) for r in result["runs"] if r["alignment"])
    fig, axes = plt.subplots(len(panels), nlayers, figsize=(3.6 * nlayers, 2.8 * len(panels)), squeeze=False)
    colors = {"fa": "tab:blue", "dfa": "tab:orange", "fdfa": "tab:green", "fg-w": "tab:red"}
    for i, (ds, model) in enumerate(panels):
        for r in result["runs"]:
            if (r["dataset"], r["model"]) != (ds, model) or not r["alignment"]:
                continue
            steps = [a["step"] for a in r["alignment"]]
            for j in range(len(r["alignment"][0]["deg"])):
                axes[i][j].plot(steps, [a["deg"][j] for a in r["alignment"]], label=r["method"],
                                color=colors.get(r["method"]))  # fmt: skip
        for j in range(nlayers):
            ax = axes[i][j]
            if not ax.lines:
                ax.set_visible(False)
                continue
            ax.set_title(f"{ds} {model}: hidden layer {j + 1}", fontsize=9)
            ax.axhline(90, color="grey", lw=0.5, ls="--")
            ax.set_ylim(0, 105)
            ax.set_xlabel("step", fontsize=8)
            if j == 0:
                ax.set_ylabel("angle to exact gradient (deg)", fontsize=8)
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def table(result: dict[str, Any]) -> str:
    rows = ["| data | model | " + " | ".join(result["setup"]["methods_run"]) + " |",
            "|---|---|" + "---|" * len(result["setup"]["methods_run"])]  # fmt: skip
    for ds in result["setup"]["datasets"]:
        for model in result["setup"]["models"]:
            errs = {r["method"]: r["test_error"] for r in result["runs"] if (r["dataset"], r["model"]) == (ds, model)}
            rows.append(f"| {ds} | {model} | " + " | ".join(f"{errs[m]:.2f}" for m in result["setup"]["methods_run"])
                        + " |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["speed", "accuracy"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", type=int, default=2, help="speed: hidden layers of fc-bn")
    p.add_argument("--rounds", type=int, default=60, help="speed: timed rounds")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    p.add_argument("--models", nargs="+", default=["fc-bn", "cnn-small"])
    p.add_argument("--methods", nargs="+", default=["bp", "fa", "dfa", "fdfa", "fg-w"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--align-every", type=int, default=25)
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/feedback_alignment_<what>.json)")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"feedback_alignment_{args.what}.json"
    if args.what == "speed":
        result = speed(args)
    else:
        result = accuracy(args, out)
        print(table(result))
        plot_alignment(result, out.with_suffix(".png"))
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
