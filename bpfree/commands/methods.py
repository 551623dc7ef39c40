"""`bpfree methods`: every registered learning rule with a one-line description, its options and its paper."""

from __future__ import annotations

import argparse

from bpfree import methods


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    names = methods.METHODS.names()
    width = max(len(n) for n in names)
    for name in names:
        entry = methods.METHODS.get(name)
        print(f"{name:<{width}}  {entry.description}  [{entry.paper}]")
        if entry.options:
            flags = ", ".join(f"--{k.replace('_', '-')} ({o.default})" for k, o in entry.options.items())
            print(f"{'':<{width}}  options: {flags}")
    return 0
