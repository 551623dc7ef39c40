"""`bpfree methods`: every registered learning rule with a one-line description, its options and its paper;
`--matrix`: which rule runs on which kind of model (`bpfree.lab.matrix`), a user's own models as more columns."""

from __future__ import annotations

import argparse

import torch

from bpfree import methods
from bpfree.core.errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--matrix", action="store_true",
        help="print the method x model table instead: every cell built on tiny inputs and stepped once "
        "(a mark, or the one-line reason the rule is undefined for the model)",
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="FILE:CLASS",
        help="with --matrix: a user's model as one more column (path/to/file.py:Class, called with num_classes and "
        "input_shape as for `bpfree train --model`); repeat for several",
    )
    parser.add_argument("--input-shape", default="3,16,16", metavar="C,H,W",
                        help="with --matrix: the input shape of the --model columns")


def input_shape(text: str) -> tuple[int, ...]:
    """`C,H,W` (or any number of positive sizes) as a tuple; UsageError otherwise."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UsageError(f"--input-shape {text}: expected positive sizes such as 3,16,16")
    return shape


def run(args: argparse.Namespace) -> int:
    if not args.matrix and (args.model or args.input_shape != "3,16,16"):
        raise UsageError("--model and --input-shape are columns of the matrix: add --matrix")
    if args.matrix:
        from bpfree.lab import matrix

        torch.set_num_threads(1)
        print(matrix.table(extra=matrix.user_columns(args.model, input_shape(args.input_shape))))
        return 0
    names = methods.METHODS.names()
    width = max(len(n) for n in names)
    for name in names:
        entry = methods.METHODS.get(name)
        print(f"{name:<{width}}  {entry.description}  [{entry.paper}]")
        if entry.options:
            flags = ", ".join(f"--{k.replace('_', '-')} ({o.default})" for k, o in entry.options.items())
            print(f"{'':<{width}}  options: {flags}")
    return 0
