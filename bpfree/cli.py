"""The `bpfree` command line. Each subcommand is a module with `add_arguments(parser)` and `run(args) -> int`.

Exit codes, each with one line on stderr and never a traceback: 0 success; 1 `compare` wrote its table but a run
failed or diverged; 2 bad input, including a run folder that is in use, damaged or cannot be written (disk full,
read-only, path too long) and a model or option that does not fit in memory; 3 the loss became NaN/inf; 4 a
data-parallel rank died or stopped answering; 130 interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM).
Interrupted and terminated runs end alike: the write in progress is finished, temp files are removed and the run
folder's lock released, so `--resume` continues from the last epoch.
In a data-parallel run the lines of ranks other than 0 are prefixed with their rank.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from bpfree.core.errors import DistributedError, DivergedError, Terminated, UsageError
from bpfree.training.runfolder import describe_os_error, first_line

# name -> (module, one-line help). A new subcommand is one line here.
SUBCOMMANDS = {
    "train": ("bpfree.commands.train", "train one model with one learning rule"),
    "models": ("bpfree.commands.models", "list the registered models with their parameter counts"),
    "methods": ("bpfree.commands.methods", "list the registered learning rules and their papers"),
    "compare": ("bpfree.commands.compare", "train several learning rules x seeds alike: one results table, plots"),
    "report": ("bpfree.commands.report", "the results table and plots of existing run folders"),
    "grad-quality": ("bpfree.commands.grad_quality", "cosine / norm ratio of gradient estimates vs the exact gradient"),
    "sweep": ("bpfree.commands.sweep", "choose each method's recipe (lr, optimizer, ...) on validation error"),
    "lr-find": ("bpfree.commands.lr_find", "learning-rate range test on validation data: table, plot, choice"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the uninformative None/False ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with a bad option value answered by one line (the usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
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


def format_bytes(n: float) -> str:
    """1024-based, as torch's CUDA messages print sizes: `3.64 TiB`."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} PiB"


def out_of_memory(error: BaseException) -> str | None:
    """`out of memory: tried to allocate 3.64 TiB` for torch's CPU and CUDA allocation failures, else None."""
    import torch

    text = str(error)
    if not (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", text, re.IGNORECASE)  # CPU: bytes
    if asked:
        amount = format_bytes(int(asked.group(1)))
    else:
        asked = re.search(r"tried to allocate ([\d.]+ ?[KMGTP]?i?B)", text, re.IGNORECASE)  # CUDA: "1.50 GiB"
        amount = asked.group(1) if asked else None
    what = f"tried to allocate {amount}" if amount else first_line(error)[:200]
    return f"out of memory: {what} (a smaller model, --batch-size or --tangents needs less)"


def _exit_now(code: int) -> None:
    """End the process at once (after flushing our output), skipping interpreter teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    # torch's C++ warnings (e.g. the memory meter's "Memory block of unknown size was allocated before the profiling
    # started") address torch's developers, not a user reading a run's output; read when torch is first imported,
    # below, and a level the user set stands. Python warnings are unaffected.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"bpfree[rank {rank}]" if rank else "bpfree"
    # SIGTERM ends a run as Ctrl-C does, from the start (building the parser imports torch, which takes seconds).
    # Not in a torchrun worker: there SIGTERM is how the launcher stops the ranks after one failed, and it must act
    # at once, even on a rank waiting inside a collective.
    worker = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handle_term = not worker and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if handle_term else None
    try:
        try:
            with _exit_on_signals(prefix, handle_term):
                args = make_parser().parse_args(argv)
            from bpfree.core.memory import keep_cpu_heap

            keep_cpu_heap()  # a training step frees and reallocates the same sizes: keep them (docs/models.md)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while starting up
            return _stopped(prefix, e)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` relaunches this command line
        return _run(args, prefix, worker)
    finally:
        if handle_term:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def _exit_on_signals(prefix: str, active: bool) -> Iterator[None]:
    """While starting up (importing torch): SIGINT / SIGTERM end the process at once with their line and code.

    Nothing is open yet, so nothing needs cleaning up; an exception raised by a handler instead could land inside
    an import that catches it (the signal was lost) or that is retried half-done (an ImportError traceback).
    """
    if not active:
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        print(f"{prefix}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}", file=sys.stderr)
        _exit_now(143 if signum == signal.SIGTERM else 130)

    # A signal ignored by whoever started bpfree (SIGINT in a background job) stays ignored.
    before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)
              if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _stopped(prefix: str, signal_error: KeyboardInterrupt) -> int:
    """`bpfree: terminated` (143) for SIGTERM, `bpfree: interrupted` (130) for SIGINT."""
    terminated = isinstance(signal_error, Terminated)
    print(f"{prefix}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130


def _run(args: argparse.Namespace, prefix: str, worker: bool) -> int:
    """Run the command; every error it ends with becomes one line on stderr and its exit code."""
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
        if worker:  # the lock is released and temp files are gone; torch's teardown could wait on the lost peer
            _exit_now(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt as e:  # Terminated (SIGTERM) too
        return _stopped(prefix, e)
    except SystemExit as e:  # user code (a model's forward) called sys.exit during the run: its exit is not ours
        print(f"{prefix}: error: user code called sys.exit({e.code!r}) during the run", file=sys.stderr)
        return UsageError.exit_code
    except OSError as e:  # the file system said no (disk full, read-only, a name too long) where not caught before
        print(f"{prefix}: error: {describe_os_error(e)}", file=sys.stderr)
        return UsageError.exit_code
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        message = out_of_memory(e)
        if message is None:
            raise
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return UsageError.exit_code


if __name__ == "__main__":
    sys.exit(main())
