"""Where a staged epoch's time goes, per stage: wall, busy and idle seconds, the process's CPU seconds, page faults,
and the CPU seconds of each phase of the rule's step (forward pass, late update, map gradients, sends, receives).

    BPFREE_DATA=/work/data PYTHONPATH=. python benchmarks/stages_phases.py --rule fg-a --split blocks.4

Phases are timed in CPU seconds (time.process_time: all of the process's threads), not wall seconds, so that they
compare across modes on a shared machine: a stage that is ready to run while another process has its core spends
wall-clock "busy" time but no CPU time. Both modes run the same split (`--split`), so they do the same arithmetic.
One warm-up epoch, then one timed epoch of `--train-size` CIFAR-10 images, two stages, one thread each. Prints one
JSON line per stage and mode, and one for the same rule in one process (its epoch's CPU seconds); last, per mode,
the one-process CPU seconds over the larger stage's: the speed-up the stages would give on free cores if they never
waited (a projection from CPU time, which a shared machine's load barely changes, not a measured throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rule", default="fg-a")
    p.add_argument("--width", type=int, default=32, help="resnet18's width")
    p.add_argument("--split", default="blocks.4", help="the first block of stage 2 (the same in every mode)")
    p.add_argument("--modes", default="pipelined,synchronous")
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--stage", help=argparse.SUPPRESS)  # set in the stage processes this script starts: the mode
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def timed(totals: dict[str, list[float]], obj: Any, name: str, key: str | None = None) -> None:
    """Wrap obj.name so that its CPU seconds and calls add up in totals[key]."""
    original: Callable[..., Any] = getattr(obj, name)
    key = key or name

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key][0] += time.process_time() - start
            totals[key][1] += 1

    setattr(obj, name, wrapper)


def config(args: argparse.Namespace, name: str) -> Any:
    from bpfree.training.train import TrainConfig

    return TrainConfig(method=args.rule, model="resnet18", model_options={"width": args.width}, data="cifar10",
                       train_size=args.train_size, batch_size=args.batch_size, epochs=1, optimizer="adam", lr=1e-3,
                       out=str(Path(args.out) / name))


def one_process_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from bpfree.training.train import Run

    run = Run(config(args, "one"), show_progress=False)
    run.train_epoch()  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    run.train_epoch()
    print(json.dumps({"mode": "one process", "wall_s": round(time.perf_counter() - start, 3),
                      "cpu_s": round(time.process_time() - cpu, 3)}), flush=True)
    run.close()


def stage_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from bpfree.methods.forward_gradient import ForwardGradientActivity
    from bpfree.training.stages import StagedRun

    mode = args.stage
    cfg = replace(config(args, mode), stages=2, stage_split=args.split, stage_mode=mode)
    run = StagedRun(cfg, show_progress=False)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    est = run.estimator
    for name in ("_forward_only", "_late_update"):
        timed(totals, run, name)
    timed(totals, run.optimizer, "step", "optimizer.step")
    timed(totals, est, "step", "estimator.step")
    for name in ("send", "recv", "recv_late", "share_from_last"):
        timed(totals, run.link, name, f"link.{name}")
    if isinstance(est, ForwardGradientActivity):
        timed(totals, est, "_activity_pass")
        map_grads = ForwardGradientActivity._map_grads

        def counted(self: Any, rec: Any, c: Any) -> None:
            start = time.process_time()
            map_grads(self, rec, c)
            totals["_map_grads"][0] += time.process_time() - start
            totals["_map_grads"][1] += 1

        ForwardGradientActivity._map_grads = counted  # type: ignore[method-assign]
    run.train_epoch()  # warm-up
    totals.clear()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    record = run.train_epoch()
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    s = run.plan.stage
    print(json.dumps({
        "mode": mode, "stage": s, "split": args.split, "wall_s": round(wall, 3),
        "busy_s": round(record[f"stage{s}_busy_seconds"], 3), "idle_s": round(record[f"stage{s}_idle_seconds"], 3),
        "cpu_s": round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 3),
        "minor_faults": after.ru_minflt - before.ru_minflt, "max_rss_mb": after.ru_maxrss // 1024,
        "phases_cpu_s": {k: {"seconds": round(v[0], 3), "calls": v[1]} for k, v in sorted(totals.items())}}),
        flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.stage == "one":
        one_process_main(args)
        return 0
    if args.stage:
        stage_main(args)
        return 0
    given = argv if argv is not None else sys.argv[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, __file__, *given, "--stage", "one", "--out", tmp], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"one process failed ({done.returncode}):\n{done.stderr[-2000:]}")
        print(done.stdout.strip(), flush=True)
        one_cpu = json.loads(done.stdout.strip().splitlines()[-1])["cpu_s"]
        for mode in args.modes.split(","):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, __file__, *given, "--stage", mode, "--out", tmp]
            procs = [subprocess.Popen(cmd, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                                 "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                                 "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
            for p in procs:
                out, err = p.communicate()
                if p.returncode != 0:
                    raise SystemExit(f"stage failed ({p.returncode}):\n{err[-2000:]}")
                print(out.strip(), flush=True)
                cpu.setdefault(mode, []).append(json.loads(out.strip().splitlines()[-1])["cpu_s"])
    for mode, seconds in cpu.items():
        print(json.dumps({"mode": mode, "one_process_cpu_s": one_cpu, "stage_cpu_s": seconds,
                          "cpu_speedup": round(one_cpu / max(seconds), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
