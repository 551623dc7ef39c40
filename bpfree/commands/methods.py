"""`bpfree methods`: every registered learning rule with a one-line description, its options and its paper;
`--matrix`: which rule runs on which kind of model (`bpfree.lab.matrix`)."""

from __future__ import annotations

import argparse

import torch

from bpfree import methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--matrix", action="store_true",
        help="print the method x model table instead: every cell built on tiny inputs and stepped once "
        "(a mark, or the one-line reason the rule is undefined for the model)",
    )


def run(args: argparse.Namespace) -> int:
    if args.matrix:
        from bpfree.lab import matrix

        torch.set_num_threads(1)
        print(matrix.table())
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
