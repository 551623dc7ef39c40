"""Bytes communicated per data-parallel step, per method, and the cost of the gradient all-reduce layouts.

    python benchmarks/distributed_comm.py [--nproc 2] [--hidden 1024,1024] [--data mnist] [--train-size 1024]

Starts NPROC local ranks through torch.distributed.run (gloo), trains one short epoch of each method on the same
MLP, and prints (rank 0) a markdown table of `comm_bytes_per_step` (payload bytes each rank all-reduces per step,
read from metrics.jsonl) and step time; then times one flattened all-reduce of a full gradient against one
all-reduce per parameter tensor and against ~4 MB buckets (the choice made in bpfree.training.distributed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = [
    ("bp", {}),
    ("fg-w", {"tangents": 1}),
    ("fg-w", {"tangents": 16}),
    ("fg-w", {"tangents": 16, "exact_readout": False}),
    ("fg-a", {"tangents": 1}),
]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", default="1024,1024")
    p.add_argument("--data", default="mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10, help="all-reduce timing repetitions")
    p.add_argument("--only-allreduce", action="store_true", help="skip the training runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from bpfree import models
    from bpfree.training.distributed import Group
    from bpfree.training.train import Run, TrainConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        for i, (method, opts) in enumerate([] if args.only_allreduce else METHODS):
            cfg = TrainConfig(method=method, model="mlp", data=args.data, data_root=args.data_root, epochs=1,
                              batch_size=args.batch_size, train_size=args.train_size, lr=1e-4,
                              model_options={"hidden": hidden}, method_options=opts, out=str(out / str(i)))
            run = Run(cfg, show_progress=False)
            record = run.train()[-1]
            rows.append((method, opts, record["comm_bytes_per_step"], 1000 * record["seconds"] / run.steps_per_epoch))
    shape = (1, 28, 28) if args.data in ("mnist", "fashion-mnist") else (3, 32, 32)
    model = models.build("mlp", 10, shape, hidden=hidden)
    params = [p.detach().clone() for p in model.parameters()]
    n_params = sum(p.numel() for p in params)
    if rank == 0 and rows:
        print(f"\n{dist.get_world_size()} ranks, mlp {shape} -> {args.hidden} -> 10 "
              f"({n_params:,} parameters), global batch {args.batch_size}\n")
        print("| method | options | bytes / step / rank | vs bp | ms / step |")
        print("|---|---|---|---|---|")
        bp_bytes = rows[0][2]
        for method, opts, b, ms in rows:
            ratio = f"{bp_bytes / b:,.0f}x fewer" if bp_bytes / b > 1.5 else "same"
            print(f"| {method} | {json.dumps(opts)} | {b:,.0f} | {ratio} | {ms:.1f} |")

    def flat() -> None:
        buf = torch.cat([p.reshape(-1) for p in params])
        dist.all_reduce(buf)
        offset = 0
        for p in params:
            p.copy_(buf[offset: offset + p.numel()].view_as(p))
            offset += p.numel()

    def per_tensor() -> None:
        for p in params:
            dist.all_reduce(p)

    def buckets(size: int = 1 << 20) -> None:  # 1 Mi floats = 4 MB
        group: list[torch.Tensor] = []
        for p in params + [None]:
            if p is not None:
                group.append(p)
            if group and (p is None or sum(t.numel() for t in group) >= size):
                buf = torch.cat([t.reshape(-1) for t in group])
                dist.all_reduce(buf)
                offset = 0
                for t in group:
                    t.copy_(buf[offset: offset + t.numel()].view_as(t))
                    offset += t.numel()
                group = []

    group = Group(rank, dist.get_world_size())

    def bpfree_layout() -> None:
        group.weighted_mean_(params, 1.0)

    times = {}
    for name, fn in (("one flattened all-reduce", flat), ("one all-reduce per tensor", per_tensor),
                     ("4 MB buckets", buckets), ("bpfree (big in place, rest packed)", bpfree_layout)):
        fn()  # warm-up
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        dist.barrier()
        times[name] = 1000 * (time.perf_counter() - start) / args.repeats
    if rank == 0:
        print(f"\nall-reduce of the full gradient ({4 * n_params / 2**20:.1f} MiB, {len(params)} tensors), "
              f"{args.repeats} repetitions:\n")
        for name, ms in times.items():
            print(f"  {name:36s} {ms:7.1f} ms   ({ms / times['one flattened all-reduce']:.2f}x flat)")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    if args.worker:
        worker(args)
        return 0
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc, rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", run_id=f"bench-{os.getpid()}", max_restarts=0,
                          monitor_interval=0.1)
    elastic_launch(config, sys.executable)(os.path.abspath(__file__), *(argv or sys.argv[1:]), "--worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
