"""A staged run started from inside a program that is one process (`bpfree compare --stages S`): S local processes
(spawned, one per stage, a fresh port each), each running `stages.train` on the same config; the outcome comes back
as the exception one process would raise (DivergedError, UsageError, DistributedError), so the caller handles a
staged run as any other."""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from bpfree.core.errors import DistributedError, DivergedError, UsageError
from bpfree.training.config import TrainConfig

# exit codes of a stage process, by what ended it (as `bpfree train`'s)
CODES = {DivergedError: 3, UsageError: 2, DistributedError: 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage(rank: int, config: dict[str, Any], port: int, threads: int | None, errors: str) -> None:
    """One stage process: the group from a torchrun-style environment, then the staged run."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(config["stages"]), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if threads is not None:
        torch.set_num_threads(threads)
    from bpfree.training import stages as staged

    try:
        staged.train(TrainConfig(**config), show_progress=False)
    except tuple(CODES) as e:
        kind = next(k for k in CODES if isinstance(e, k))
        Path(errors, f"rank{rank}").write_text(f"{kind.__name__}\n{e}")
        raise SystemExit(CODES[kind]) from None


def train_staged(cfg: TrainConfig, threads: int | None = None) -> list[dict[str, Any]]:
    """Train `cfg` on `cfg.stages` local processes; its metrics records (read from its run folder), or the exception
    of the stage that failed first with an error of its own (a stage that only lost its peer says 4)."""
    from bpfree.training.runfolder import read_metrics

    with tempfile.TemporaryDirectory() as errors:
        try:
            mp.start_processes(_stage, args=(asdict(cfg), _free_port(), threads, errors), nprocs=cfg.stages,
                               start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            found = {p.name: p.read_text().split("\n", 1) for p in sorted(Path(errors).iterdir())}
            if not found and isinstance(e, mp.ProcessRaisedException):  # a stage's own bug: its last line
                raise RuntimeError(f"a stage failed: {str(e).strip().splitlines()[-1]}") from None
            own = [(kind, text) for kind, text in found.values() if kind != "DistributedError"]
            kind, text = (own or list(found.values()) or [("DistributedError", str(e).strip().splitlines()[0])])[0]
            raise {c.__name__: c for c in CODES}[kind](text) from None
    return read_metrics(Path(cfg.out) / "metrics.jsonl")
