"""Block-parallel throughput: `train --stages 2` against the same rule in one process, the machine's two-process
limit, and backprop's pipeline (torch.distributed.pipelining) on the same two stages.

    BPFREE_DATA=/work/data PYTHONPATH=. python benchmarks/stages.py --model resnet18 --rules l-bp,sff-block,lg-fg-a
    BPFREE_DATA=/work/data PYTHONPATH=. python benchmarks/stages.py --model vit --rules l-bp,sff-block,lg-fg-a
    BPFREE_DATA=/work/data PYTHONPATH=. python benchmarks/stages.py --model resnet18 --rules dfa,fg-a \
        --modes synchronous,pipelined --skip-bp --tag _pipelined

Every process runs one thread. Per rule it times one training epoch of `--train-size` CIFAR-10 images (`seconds`
in metrics.jsonl: the epoch's training, not start-up or evaluation):
- one: the rule in one process;
- pair: two independent copies of `one` started together; their summed throughput over `one`'s is this machine's
  two-process limit (the most two processes can give, contention included);
- staged: `--stages 2` (balanced split), once per `--modes` value (`--stage-mode`).
Then bp through torch.distributed.pipelining (`train --method bp --stages 2`, training/pipeline_bp.py) on the staged
l-bp run's split: GPipe and 1F1B, 2/4/8 micro-batches, one epoch each as above, best of them.
Writes a JSON file and prints a markdown table. The machine may be shared: compare numbers of one invocation only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"resnet18": ["--model", "resnet18", "--width", "32"],
          "vit": ["--model", str(ROOT / "examples" / "vit.py") + ":ViT"]}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    p.add_argument("--rules", default="l-bp,sff-block,lg-fg-a")
    p.add_argument("--train-size", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--modes", default="synchronous",
                   help="--stage-mode values to time each rule's 2 stages in (pipelined: dfa and fg-a)")
    p.add_argument("--skip-bp", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stages"))
    p.add_argument("--tag", default="", help="appended to the result file's name (MODEL{TAG}.json)")
    return p.parse_args(argv)


def command(args: argparse.Namespace, rule: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bpfree", "train", "--method", rule, *MODELS[args.model], "--data", "cifar10",
            "--train-size", str(args.train_size), "--batch-size", str(args.batch_size), "--epochs", "1",
            "--threads", "1", "--out", str(out), *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, out: Path) -> dict:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(proc.args)}\n{err[-2000:]}")
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def time_rule(args: argparse.Namespace, rule: str, work: Path) -> list[dict]:
    """One row per --modes value; the one-process run and the limit are timed once, just before the staged runs."""
    one = finish(start(command(args, rule, work / f"{rule}-one")), work / f"{rule}-one")
    pair_procs = [start(command(args, rule, work / f"{rule}-pair{i}")) for i in range(2)]
    pair = [finish(p, work / f"{rule}-pair{i}") for i, p in enumerate(pair_procs)]
    rows = []
    for mode in args.modes.split(","):
        staged_out = work / f"{rule}-staged-{mode}"
        staged = finish(start(command(args, rule, staged_out, "--stages", "2", "--stage-mode", mode)), staged_out)
        rows.append(staged_row(args, rule, mode, one, pair, staged, staged_out))
    return rows


def staged_row(args: argparse.Namespace, rule: str, mode: str, one: dict, pair: list[dict], staged: dict,
               staged_out: Path) -> dict:
    n = args.train_size
    config = json.loads((staged_out / "config.json").read_text())
    one_ips = n / one["seconds"]
    limit = sum(n / r["seconds"] for r in pair) / one_ips
    speedup = (n / staged["seconds"]) / one_ips
    return {
        "rule": rule if mode == "synchronous" else f"{rule} ({mode})", "mode": mode,
        "one_images_per_s": one_ips, "pair_seconds": [r["seconds"] for r in pair],
        "limit": limit, "staged_images_per_s": n / staged["seconds"], "speedup": speedup,
        "share_of_limit": speedup / limit, "stage_split": config["stage_split"],
        "stage_share_profiled": config["stage_profile"]["stage_share"],
        "block_seconds": config["stage_profile"]["block_seconds"],
        "stage_busy_s": [staged[f"stage{s}_busy_seconds"] for s in (0, 1)],
        "stage_idle_s": [staged[f"stage{s}_idle_seconds"] for s in (0, 1)],
        "stage_cpu_s": [staged.get(f"stage{s}_cpu_seconds") for s in (0, 1)],
        "stage_sent_bytes_per_step": staged["stage0_sent_bytes_per_step"],
        "stage_peak_mb": [staged[f"stage{s}_peak_memory_mb"] for s in (0, 1)],
        "one_peak_mb": one["peak_memory_mb"],
    }


# -- bp on torch.distributed.pipelining --------------------------------------------------------------------------


def time_bp(args: argparse.Namespace, split: str, work: Path) -> list[dict]:
    """bp on the same two stages through `train --stages 2` (torch.distributed.pipelining): one epoch per schedule
    and micro-batch count, as the rules are timed."""
    rows = []
    for schedule in ("gpipe", "1f1b"):
        for micro in (2, 4, 8):
            out = work / f"bp-{schedule}-{micro}"
            try:
                metrics = finish(start(command(args, "bp", out, "--stages", "2", "--stage-split", split,
                                               "--microbatches", str(micro), "--pipeline-schedule", schedule)), out)
            except SystemExit as e:  # reported, not hidden
                rows.append({"schedule": schedule, "micro_batches": micro, "error": str(e)[:2000]})
                continue
            rows.append({"schedule": schedule, "micro_batches": micro,
                         "images_per_s": args.train_size / metrics["seconds"],
                         "stage0_peak_mb": metrics["stage0_peak_memory_mb"],
                         "stage_idle_s": [metrics[f"stage{s}_idle_seconds"] for s in (0, 1)]})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": args.model, "train_size": args.train_size, "batch_size": args.batch_size,
                     "threads_per_process": 1, "cores": os.cpu_count(), "rules": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rule in args.rules.split(","):
            for row in time_rule(args, rule, work):
                results["rules"].append(row)
                print(json.dumps(row), flush=True)
        if not args.skip_bp:
            split = results["rules"][0]["stage_split"][0]
            results["bp_pipeline"] = time_bp(args, split, work)
            print(json.dumps(results["bp_pipeline"]), flush=True)
    (out / f"{args.model}{args.tag}.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


def cpu(row: dict) -> str:
    seconds = row.get("stage_cpu_s") or [None, None]
    return " / ".join("-" if s is None else f"{s:.1f}" for s in seconds)


def table(results: dict) -> str:
    lines = [f"{results['model']}, {results['train_size']} images, batch {results['batch_size']}, 1 thread/process",
             "", "| rule | one process (img/s) | 2 stages (img/s) | speed-up | 2-process limit | share of limit | "
             "stage 0 / 1 idle (s) | stage 0 / 1 busy (s) | stage 0 / 1 CPU (s) | stage 0 / 1 peak (MiB) | "
             "one-process peak (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rules"]:
        lines.append(f"| {r['rule']} | {r['one_images_per_s']:.1f} | {r['staged_images_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['limit']:.2f}x | {100 * r['share_of_limit']:.0f} % | "
                     f"{r['stage_idle_s'][0]:.1f} / {r['stage_idle_s'][1]:.1f} | "
                     f"{r['stage_busy_s'][0]:.1f} / {r['stage_busy_s'][1]:.1f} | {cpu(r)} | "
                     f"{r['stage_peak_mb'][0]:.0f} / {r['stage_peak_mb'][1]:.0f} | {r['one_peak_mb']:.0f} |")
    bp = [r for r in results.get("bp_pipeline", []) if "error" not in r]
    failed = [r for r in results.get("bp_pipeline", []) if "error" in r]
    if failed:
        lines += ["", "bp pipeline failed: " + ", ".join(f"{r['schedule']}x{r['micro_batches']}" for r in failed)]
    if bp:
        best = max(bp, key=lambda r: r["images_per_s"])
        lines += ["", "bp, torch.distributed.pipelining, same 2 stages: " + ", ".join(
            f"{r['schedule']}x{r['micro_batches']} {r['images_per_s']:.1f} img/s" for r in bp),
            f"best: {best['schedule']} with {best['micro_batches']} micro-batches, {best['images_per_s']:.1f} img/s, "
            f"stage 0 peak {best['stage0_peak_mb']:.0f} MiB"]
        for r in results["rules"]:
            ratio = r["staged_images_per_s"] / best["images_per_s"]
            lines.append(f"- {r['rule']} on 2 stages / bp's best pipeline: {ratio:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
