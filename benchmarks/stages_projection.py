"""Project `--stages S` throughput for S = 2, 4, 8, 16 from each block's measured step time and the bytes a stage
sends, and check S = 2 against the measurement of benchmarks/stages.py.

    PYTHONPATH=. python benchmarks/stages_projection.py benchmarks/results/stages/resnet18.json

Model: stage s's step time is the sum of its blocks' profiled seconds (one process, one thread, the staged run's
own profile in config.json); a stage's send of its last block's output overlaps its next step (isend), so a step
of the pipeline takes max over stages of max(compute, send time). Throughput = batch / that, against one process's
batch / (sum of all blocks). S beyond the number of blocks is capped at one block per stage. Send times are given
for several links; the compute is this CPU's (one core per stage), not a GPU's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bpfree.training.stage_plan import balanced_starts

LINKS = {"10 GbE": 1.25e9, "100 GbE": 12.5e9, "PCIe 4 x16": 25e9, "NVLink 4": 450e9}  # bytes per second


def block_bytes(model: str, batch: int) -> list[int]:
    """Bytes of each block's output for one batch (float32), from the model's anatomy."""
    import torch

    from bpfree.core.anatomy import describe

    sys.path.insert(0, str(Path(__file__).parent))
    from stages import build_model  # benchmarks/stages.py

    torch.manual_seed(0)
    anatomy = describe(build_model(model))
    return [batch * 4 * int(torch.Size(s).numel()) for s in anatomy.block_shapes]


def project(seconds: list[float], sent: list[int], stages: int, bandwidth: float) -> float:
    """Speed-up over one process of `stages` balanced stages (one block per stage at most as many as blocks)."""
    s = min(stages, len(seconds))
    starts = [*balanced_starts(seconds, s), len(seconds)]
    step = max(max(sum(seconds[a:b]), (sent[b - 1] / bandwidth if b < len(seconds) else 0.0))
               for a, b in zip(starts, starts[1:]))
    return sum(seconds) / step


def main(path: str) -> int:
    results = json.loads(Path(path).read_text())
    sent = block_bytes(results["model"], results["batch_size"])
    largest = max(sent[:-1])
    lines = [f"{results['model']}: projected speed-up over one process, one core per stage, NVLink-class link",
             "", "| rule | S=2 measured, share of the 2-process limit | S=2 projected, share of 2x | " +
             " | ".join(f"S={s}" + (f" (= {len(sent)})" if s > len(sent) else "") for s in (2, 4, 8, 16)) + " |",
             "|---" * 7 + "|"]
    for r in results["rules"]:
        if r["rule"] in ("dfa", "fdfa"):
            continue  # synchronous: a stage waits for the error; this model assumes stages never wait
        proj = [project(r["block_seconds"], sent, s, LINKS["NVLink 4"]) for s in (2, 4, 8, 16)]
        lines.append(f"| {r['rule']} | {r['speedup']:.2f}x of {r['limit']:.2f}x = {100 * r['share_of_limit']:.0f} % "
                     f"| {100 * proj[0] / 2:.0f} % | " + " | ".join(f"{p:.2f}x" for p in proj) + " |")
    lines.append("")
    lines.append(f"{len(sent)} blocks (S = 16 is capped at one block per stage). Largest send per step: "
                 f"{largest / 2**20:.1f} MiB, " + ", ".join(f"{1e3 * largest / bw:.2f} ms on {name}"
                                                             for name, bw in LINKS.items()) +
                 "; compute per step (one process): " +
                 ", ".join(f"{r['rule']} {sum(r['block_seconds']):.2f} s" for r in results["rules"]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
