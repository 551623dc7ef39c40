"""Forward-Forward recipe diagnosis: short MNIST runs of `ff`, test error per epoch of every inference.

Each line: goodness inference (layers but the first; Hinton's), all layers, each layer alone, the linear readout
(neutral label), and the epoch's training means of pair_error (negative goodness >= positive) and layer losses.
The baseline is the old default recipe (logistic loss, threshold 1 on the mean goodness, random negatives,
label value 1); --method / --model take JSON overrides, e.g.

    OMP_NUM_THREADS=1 python benchmarks/ff_recipe.py --hidden 500,500,500 --epochs 4 \
        --method '{"negatives": "hard", "loss": "contrast", "contrast_scale": 50}' --model '{"label_value": 3}'

Budget: 10,000 training images, the first 2,000 test images (binomial sd ~0.6 % at 8 % error), seed 0.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from bpfree import data
from bpfree.methods import build as build_method
from bpfree.models import build as build_model

OLD_METHOD = {"threshold": 1.0, "goodness": "mean", "negatives": "random", "greedy_steps": 0,
              "inference": "goodness", "peer_norm": 0.0, "loss": "logistic", "contrast_scale": 4.0}
OLD_MODEL = {"label_value": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="run")
    ap.add_argument("--hidden", default="500,500")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    ap.add_argument("--method", default="{}", help="JSON: ff options over the old defaults")
    ap.add_argument("--model", default="{}", help="JSON: ff-mlp options over the old defaults")
    ap.add_argument("--data-root", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = data.load("mnist", a.data_root, train_size=a.train_size)
    tx, ty = ds.test_x[: a.test_size], ds.test_y[: a.test_size]
    torch.manual_seed(0)
    hidden = tuple(int(h) for h in a.hidden.split(","))
    model = build_model("ff-mlp", 10, ds.input_shape, hidden=hidden, **{**OLD_MODEL, **json.loads(a.model)})
    est = build_method("ff", model, seed=0, **{**OLD_METHOD, **json.loads(a.method)})
    if a.optimizer == "adam":
        opt = torch.optim.Adam(est.trainable(), lr=a.lr)
    else:
        opt = torch.optim.SGD(est.trainable(), lr=a.lr, momentum=0.9)
    total = a.epochs * ds.num_train_batches(a.batch)
    cosine = a.schedule == "cosine"
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)) if cosine else 1.0
    )
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    for epoch in range(a.epochs):
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        for x, y in ds.train_batches(a.batch, gen):
            opt.zero_grad(set_to_none=True)
            extra = est.step(x, y).extra or {}
            opt.step()
            sched.step()
            for k, v in extra.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        model.eval()
        with torch.no_grad():
            acts = model.activities_per_label(tx)  # [C, B, width] per layer
            per_layer = torch.stack([a.pow(2).sum(-1).t() for a in acts])  # [L, B, C]
            readout = model(tx)

        def err(scores: torch.Tensor) -> float:
            return 100 * (scores.argmax(1) != ty).float().mean().item()

        good = per_layer[1:].sum(0) if len(acts) > 1 else per_layer[0]
        layers = " ".join(f"L{i}={err(s):.1f}" for i, s in enumerate(per_layer))
        losses = " ".join(f"{k[5:]}={v / steps:.3f}" for k, v in sorted(sums.items()) if k.startswith("loss_layer"))
        print(f"{a.name} ep{epoch + 1} good_err={err(good):.2f} all={err(per_layer.sum(0)):.2f} {layers} "
              f"readout_err={err(readout):.2f} pair_tr={sums['pair_error'] / steps:.2f} {losses} "
              f"t={time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
