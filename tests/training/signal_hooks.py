"""Writes that send their own process a signal at a chosen point: deterministic kills and interrupts for
tests/training/test_runfolder.py. Imported by the tests (monkeypatched in), or run as a script:

    python tests/training/signal_hooks.py checkpoint|append CALL SIGNAL bpfree-arguments...

runs `bpfree ARGS` with the CALL-th checkpoint write (inside torch.save, after its first chunk of bytes reached the
temp file) or metrics line (half the line on disk) sending SIGNAL to the process.
"""

import json
import os
import signal
import sys

import torch

import bpfree.training.checkpoint


class SignalAfterFirstChunk:
    """A file wrapper whose first write is followed by the signal (torch.save writes a checkpoint in chunks)."""

    def __init__(self, f, sig: int):
        self.f, self.sig, self.chunks = f, sig, 0

    def write(self, data):
        n = self.f.write(data)
        self.chunks += 1
        if self.chunks == 1:
            self.f.flush()
            os.kill(os.getpid(), self.sig)
        return n

    def flush(self):
        self.f.flush()


def signalling_save(call: int, sig: int):
    """torch.save whose `call`-th use is interrupted by `sig` after its first chunk."""
    real, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        return real(obj, SignalAfterFirstChunk(f, sig) if len(calls) == call else f, *args, **kwargs)

    return save


def signalling_append(call: int, sig: int):
    """The trainer's append_line whose `call`-th line is cut in half by `sig`."""
    real, calls = bpfree.training.checkpoint.append_line, []

    def append(path, record):
        calls.append(1)
        if len(calls) == call:
            with open(path, "a") as f:
                f.write(json.dumps(record)[:25])
                f.flush()
                os.kill(os.getpid(), sig)
        return real(path, record)

    return append


if __name__ == "__main__":
    where, call, sig = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3])
    if where == "checkpoint":
        torch.save = signalling_save(call, sig)
    else:
        bpfree.training.checkpoint.append_line = signalling_append(call, sig)
    from bpfree.cli import main

    sys.exit(main(sys.argv[4:]))
