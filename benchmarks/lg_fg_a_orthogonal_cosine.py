"""lg-fg-a --aggregation orthogonal against lg-bp's exact LG gradient: mean cosine over MNIST batches (issue 17.3).

    PYTHONPATH=. BPFREE_DATA=/path/to/data python benchmarks/lg_fg_a_orthogonal_cosine.py --channels 16 --groups 2

LocalMixer M/1/16's layout (one block, whole image one token) at its initial weights, with --channels/--groups to
shrink it: the projection's gain over the mean shows once K approaches the number of live (unmasked) coordinates of
an example. Every batch: lg-bp's block gradient, then lg-fg-a's estimate on the same parameters and batch; the
cosine over all block parameters; mean +- std over the batches.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from bpfree.data.datasets import load
from bpfree.methods import build as build_method
from bpfree.models import build as build_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--tangents", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load("mnist")
    torch.manual_seed(0)
    model = build_model("localmixer-m1-16", 10, (1, 28, 28), channels=args.channels, groups=args.groups)
    params = list(model.blocks.parameters())
    reference = build_method("lg-bp", model, seed=0)
    print(f"LocalMixer 1 block, {args.channels} channels, {args.groups} groups; MNIST, {args.batches} batches of "
          f"{args.batch_size}")
    for k in args.tangents:
        for aggregation in ("mean", "orthogonal"):
            est = build_method("lg-fg-a", model, seed=0, tangents=k, aggregation=aggregation)
            cosines = []
            for i in range(args.batches):
                sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
                x, y = data.train_x[sl], data.train_y[sl]
                model.zero_grad()
                reference.step(x, y)
                exact = torch.cat([p.grad.flatten() for p in params])
                model.zero_grad()
                est.step(x, y)
                estimate = torch.cat([p.grad.flatten() for p in params])
                cosines.append(float(F.cosine_similarity(exact, estimate, dim=0)))
            print(f"  K={k:3d} {aggregation:10s} cosine with lg-bp {statistics.mean(cosines):.3f} "
                  f"+- {statistics.stdev(cosines):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
