"""Cost of `compare`'s setup check: every method's model + estimator + optimizer built and one step on 8 examples.

    python benchmarks/compare_setup_check.py configs/mnist-localmixer-m1-16.json

Plans the comparison of the given config file exactly as `bpfree compare --config FILE` does, loads its data, and
times `bpfree.lab.compare.dry_run` once per method (1 thread). Prints one line per method and the total.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch

from bpfree import data as datasets
from bpfree.cli import make_parser
from bpfree.commands.compare import plan
from bpfree.lab.compare import dry_run


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        args = make_parser().parse_args(["compare", "--config", sys.argv[1], "--out", out])
        _, configs, _, _ = plan(args)
    first = configs[0]
    start = time.perf_counter()
    data = datasets.load(first.data, first.data_root, first.train_size, first.augment, classes=first.classes)
    load_seconds = time.perf_counter() - start
    batches = data.train_batches(8, torch.Generator().manual_seed(0))
    batch = next(batches)
    batches.close()
    total, seen = 0.0, set()
    for cfg in configs:
        if cfg.method in seen:
            continue
        seen.add(cfg.method)
        start = time.perf_counter()
        dry_run(cfg, data, batch)
        seconds = time.perf_counter() - start
        total += seconds
        print(f"{cfg.method}: {seconds:.2f} s")
    print(f"setup check of {len(seen)} methods: {total:.2f} s (data load {load_seconds:.1f} s, not part of it)")


if __name__ == "__main__":
    main()
