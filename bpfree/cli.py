"""The `bpfree` command line. Each subcommand is a module with `add_arguments(parser)` and `run(args) -> int`.

Errors: bad input prints one line and exits 2; a diverged run exits 3; a lost data-parallel rank exits 4; never a
traceback for any of them. In a data-parallel run the lines of ranks other than 0 are prefixed with their rank.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from bpfree.errors import DistributedError, DivergedError, UsageError

# name -> (module, one-line help). A new subcommand is one line here.
SUBCOMMANDS = {
    "train": ("bpfree.commands.train", "train one model with one learning rule"),
    "models": ("bpfree.commands.models", "list the registered models with their parameter counts"),
    "methods": ("bpfree.commands.methods", "list the registered learning rules and their papers"),
    "compare": ("bpfree.commands.compare", "train several learning rules x seeds alike: one results table, plots"),
    "report": ("bpfree.commands.report", "the results table and plots of existing run folders"),
    "grad-quality": ("bpfree.commands.grad_quality", "cosine / norm ratio of gradient estimates vs the exact gradient"),
    "sweep": ("bpfree.commands.sweep", "choose each method's recipe (lr, optimizer, ...) on validation error"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the uninformative None/False ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bpfree",
        description="Train neural networks without backpropagation: forward gradients, local losses, "
        "Forward-Forward, (directional) feedback alignment.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` relaunches this command line
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"bpfree[rank {rank}]" if rank else "bpfree"
    try:
        return args.run(args) or 0
    except UsageError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return e.exit_code
    except DivergedError as e:
        print(f"{prefix}: diverged: {e}", file=sys.stderr)
        return e.exit_code
    except DistributedError as e:
        print(f"{prefix}: distributed: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bpfree: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
