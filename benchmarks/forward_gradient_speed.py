"""Speed and memory of the forward-gradient estimators against backprop (issue 3), ratios from ONE run.

    PYTHONPATH=. python benchmarks/forward_gradient_speed.py            # full: ~3 min on a 2-core CPU
    PYTHONPATH=. python benchmarks/forward_gradient_speed.py --quick    # smoke test: ~30 s

Time: MLP 784-1024-1024-1024-10, batch 128, CPU. One "step" is what the trainer calls: `estimator.step(x, y)`
(fills .grad; no optimizer). Time is the CPU time of this process (time.process_time), not wall time: on a
shared machine wall time mostly measures how long other processes held the core (wall-clock medians varied 3x
between runs here). Configurations are interleaved round by round, so the remaining drift (caches, clock
speed) hits all of them alike. Ratios use the median; ratios from the best round are printed as well.
"forward" is `model(x)` under no_grad. Cost per extra tangent = (step(K=16) - step(K=1)) / 15 / forward.

Memory: MLP of width 1024 and depth 8/16/32, batch 1024. Each configuration runs in a fresh subprocess with
MALLOC_MMAP_THRESHOLD_=65536 (so every tensor is its own mapping and freeing it returns it to the OS, making
resident memory track live tensors). The child does one warm-up step, then holds the parameters AND a full set
of gradient buffers (as a trainer holding .grad between steps does), resets the kernel's peak-RSS counter
(writes "5" to /proc/self/clear_refs), records resident memory, runs one step and reads the peak (VmHWM).
Activation memory = peak - resident-before: what a step needs above the parameters and their gradients.
(With no gradient buffers held before the step, backprop would build its gradients while freeing its saved
activations, and "peak minus params minus grads" would hide most of its activation memory.) Linux only.

Threads default to 1: the benchmark machine is shared, and with 2 threads on 2 busy cores small ops stall on
descheduled OpenMP workers (10x slower elementwise kernels observed), which makes ratios meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from bpfree.methods import build as build_method
from bpfree.models import build as build_model

TIME_CONFIGS: list[tuple[str, str, dict]] = [
    ("bp", "bp", {}),
    ("fg-a K=1", "fg-a", {}),
    ("fg-a K=1 recompute", "fg-a", {"recompute": True}),
    ("fg-w K=1", "fg-w", {}),
    ("fg-a K=16", "fg-a", {"tangents": 16}),
    ("fg-w K=16", "fg-w", {"tangents": 16}),
    ("fg-a K=1 normal", "fg-a", {"tangent_dist": "normal"}),
    ("fg-w K=1 normal", "fg-w", {"tangent_dist": "normal"}),
]

MEMORY_CONFIGS: list[tuple[str, str, dict]] = [
    ("bp", "bp", {}),
    ("fg-w", "fg-w", {}),
    ("fg-a", "fg-a", {}),
    ("fg-a recompute", "fg-a", {"recompute": True}),
]


def time_steps(repeats: int, batch: int, hidden: tuple[int, ...]) -> dict[str, list[float]]:
    """Milliseconds per step of every TIME_CONFIGS entry and of a forward pass, one list per config."""
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 28, 28), hidden=hidden)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    ests = {label: build_method(m, model, seed=1, **o) for label, m, o in TIME_CONFIGS}

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def run(label: str) -> None:
        model.zero_grad(set_to_none=True)
        ests[label].step(x, y)

    jobs = {"forward": forward, **{label: (lambda lab=label: run(lab)) for label in ests}}
    samples: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(repeats + 2):
        for k, f in jobs.items():
            t0 = time.process_time()
            f()
            if r >= 2:  # first two rounds warm up caches and lazy initialisation
                samples[k].append((time.process_time() - t0) * 1e3)
    return samples


def time_ratios(ms: dict[str, float]) -> dict[str, float]:
    fwd, bp = ms["forward"], ms["bp"]
    return {
        "fg-a step / bp step (target <= 1.0)": ms["fg-a K=1"] / bp,
        "fg-w step / bp step (target <= 1.3)": ms["fg-w K=1"] / bp,
        "fg-a extra tangent / forward (K=1->16, target <= 1.1)": (ms["fg-a K=16"] - ms["fg-a K=1"]) / 15 / fwd,
        "fg-w extra tangent / forward (K=1->16; floor ~1.7)": (ms["fg-w K=16"] - ms["fg-w K=1"]) / 15 / fwd,
        "fg-a recompute step / bp step": ms["fg-a K=1 recompute"] / ms["bp"],
    }


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def memory_child(method: str, options: dict, depth: int, width: int, batch: int) -> dict[str, float]:
    """Run in a fresh process: activation memory (MB) of one step, as described in the module docstring."""
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 32, 32), hidden=(width,) * depth)
    est = build_method(method, model, seed=1, **options)
    x = torch.randn(batch, 1, 32, 32)
    y = torch.randint(0, 10, (batch,))
    est.step(x, y)  # warm-up: lazy initialisation, allocator state
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # resident gradient buffers, touched
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    before = _status_kb("VmRSS")
    est.step(x, y)
    peak = _status_kb("VmHWM")
    return {"activation_mb": (peak - before) / 1024, "params_mb": grad_bytes / 2**20}


def memory_table(depths: list[int], width: int, batch: int, threads: int) -> dict[str, dict[int, float]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out: dict[str, dict[int, float]] = {}
    for label, method, options in MEMORY_CONFIGS:
        out[label] = {}
        for depth in depths:
            cmd = [
                sys.executable,
                __file__,
                "--memory-child",
                json.dumps([method, options, depth, width, batch]),
            ]
            cmd += ["--threads", str(threads)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            out[label][depth] = json.loads(res.stdout.strip().splitlines()[-1])["activation_mb"]
            print(f"  memory {label:16s} depth {depth:3d}: {out[label][depth]:8.1f} MB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (see module docstring)")
    ap.add_argument("--quick", action="store_true", help="few rounds, small memory configuration")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--json", help="also write all numbers to this JSON file")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        method, options, depth, width, batch = json.loads(args.memory_child)
        print(json.dumps(memory_child(method, options, depth, width, batch)))
        return 0

    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    ratios: dict[str, float] = {}
    result: dict = {"ratios": ratios}
    if not args.skip_time:
        print(f"time: MLP 784-1024-1024-1024-10, batch 128, {repeats} interleaved rounds (CPU ms per step)")
        samples = time_steps(repeats, 128, (1024, 1024, 1024))
        ms = {k: min(v) for k, v in samples.items()}
        med = {k: statistics.median(v) for k, v in samples.items()}
        print(f"  {'':22s} {'best':>8s}    {'median':>8s}")
        for k in ms:
            print(f"  {k:22s} {ms[k]:8.1f} ms {med[k]:8.1f} ms")
        result["time_ms_best"], result["time_ms_median"] = ms, med
        ratios.update(time_ratios(med))
        ratios.update({f"{k} [from best]": v for k, v in time_ratios(ms).items()})
    if not args.skip_memory:
        width, batch, depths = (256, 256, [4, 8]) if args.quick else (1024, 1024, [8, 16, 32])
        print(f"memory: MLP width {width}, batch {batch}, depths {depths} (activation MB above params + grads)")
        mem = memory_table(depths, width, batch, args.threads)
        result["memory_mb"] = mem
        deepest = depths[-1]
        for label in mem:
            if label != "bp":
                ratios[f"{label} activation memory / bp (depth {deepest}, target <= 0.25)"] = (
                    mem[label][deepest] / mem["bp"][deepest]
                )
    print("ratios:")
    for k, v in ratios.items():
        print(f"  {k:70s} {v:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
