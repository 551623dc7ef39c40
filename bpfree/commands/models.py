"""`bpfree models`: every registered model with a one-line description and its parameter count."""

from __future__ import annotations

import argparse

from bpfree import models
from bpfree.commands.methods import input_shape
from bpfree.core.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-shape", default="1,28,28", metavar="C,H,W",
                        help="the input shape used to count parameters (MNIST by default)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes used to count parameters")


def run(args: argparse.Namespace) -> int:
    shape = input_shape(args.input_shape)
    if args.num_classes < 1:
        raise UsageError(f"--num-classes must be at least 1, got {args.num_classes}")
    rows = []
    for name in models.MODELS.names():
        entry = models.MODELS.get(name)
        # Some models fix their own input (e.g. 224-px ImageNet configs); they say so in `extra`.
        in_shape = tuple(entry.extra.get("input_shape", shape))
        try:
            count = f"{models.count_parameters(models.build(name, args.num_classes, in_shape)):,}"
        except Exception as e:  # a model that cannot take this input says why instead of failing the listing
            count = f"n/a ({type(e).__name__})"
        rows.append((name, count, "x".join(map(str, in_shape)), entry.description))
    widths = [max(len(r[i]) for r in rows + [("model", "params", "input", "")]) for i in range(3)]
    print(f"{'model':<{widths[0]}}  {'params':>{widths[1]}}  {'input':<{widths[2]}}  description")
    for name, count, in_shape, desc in rows:
        print(f"{name:<{widths[0]}}  {count:>{widths[1]}}  {in_shape:<{widths[2]}}  {desc}")
    return 0
