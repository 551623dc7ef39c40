"""A run folder's life, kept outside the training loop: lock it, check a `--resume` against what the folder holds,
write config.json, save each epoch (checkpoint, then its metrics line), record a failure, release it.

Every epoch rank 0 first writes the checkpoint, which holds the metrics records of all epochs so far, atomically,
and then appends the epoch's line to metrics.jsonl. Whatever a kill interrupts, the checkpoint covers every line on
disk; a resume rewrites metrics.jsonl from the checkpoint's records, so no epoch is lost (a torn last line is
restored) or doubled. A kill before the first checkpoint leaves no run to resume: the run starts again from epoch 1.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpfree import methods, models
from bpfree.core.errors import UsageError
from bpfree.core.group import Group
from bpfree.training.config import RESUME_FREE
from bpfree.training.runfolder import (
    RunLock,
    append_line,
    atomic_write_bytes,
    describe_load_error,
    describe_os_error,
    read_json,
    remove_temp_files,
    signals_deferred,
    write_lines,
)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
FAILED = "failed.json"  # written when a run diverges (by `compare` also when it fails otherwise)
RUN_FILES = (CHECKPOINT, METRICS, CONFIG, FAILED)  # written atomically (temp files are cleaned up on start and exit)


def note(message: str) -> None:
    """A one-line notice on stderr (not an error)."""
    print(f"bpfree: {message}", file=sys.stderr, flush=True)


def rng_state() -> dict[str, Any]:
    """The global random streams (torch, numpy, python; CUDA where present), as tensors and lists."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": np.random.get_state()[2],
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config with today's defaults filled into its method and model options.

    A run saved before an option existed ran with what is now that option's default, so it still matches (resume,
    compare's skip check, report's rows) a config that spells the default out.
    """
    out = dict(config)
    if "method" in out:
        out.setdefault("blocks", None)  # runs saved before --blocks existed found their blocks themselves
    out.setdefault("val_split", 0)  # saved before validation splits existed: none
    out.setdefault("warmup_fraction", 0.0)  # saved before --warmup-fraction existed: none
    for key, registry, name in (("method_options", methods.METHODS, "method"),
                                ("model_options", models.MODELS, "model")):
        entry = registry.entries.get(config.get(name, ""))
        if entry is not None and isinstance(config.get(key), dict):
            defaults = json.loads(json.dumps({k: o.default for k, o in entry.options.items()}))
            out[key] = {**defaults, **config[key]}
    return out


def settings_changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The settings that decide a run's numbers and differ between two stored configs (keys both hold)."""
    return [k for k in after if k not in RESUME_FREE and k in before and before[k] != after[k]]


def option_names(keys: list[str]) -> list[str]:
    """Config keys as a user gives them (world_size is --nproc)."""
    return ["--nproc" if k == "world_size" else k for k in keys]


def record_failure(out: Path, config: dict[str, Any], kind: str, error: str, detail: str = "") -> None:
    """Write `failed.json` into a run folder: how the run failed ("diverged" or "error"), in one line, plus details."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"kind": kind, "error": error, "detail": detail, "config": json.loads(json.dumps(config))}
    atomic_write_bytes(out / FAILED, lambda f: f.write(json.dumps(record, indent=2).encode()))


class RunFolder:
    """One run's folder. Rank 0 holds its lock from `open` until `close`; other ranks only learn `open`'s verdict."""

    def __init__(self, out: Path, group: Group, device: torch.device):
        self.out, self.group, self.device = out, group, device
        self.lock: RunLock | None = None
        self._parsed: dict[str, Any] | None = None  # rank 0: the checkpoint parsed while checking a resume

    def open(self, config: dict[str, Any], resume: bool, epochs: int, schedule: str) -> bytes | None:
        """Rank 0 locks and checks the folder; every rank learns the verdict: an error, or the checkpoint's bytes to
        resume from (None: a fresh start). Broadcast, so that no rank hangs on an error found by rank 0."""
        error, raw = None, None
        if self.group.is_main:
            try:
                raw = self._check(config, resume, epochs, schedule)
            except UsageError as e:
                error = e
        self.group.broadcast_error(error)
        if self.group.broadcast_bytes(b"0" if raw is None else b"1") == b"0":
            return None
        return self.group.broadcast_bytes(raw)

    def _check(self, config: dict[str, Any], resume: bool, epochs: int, schedule: str) -> bytes | None:
        """Rank 0: refuse a folder in use, an existing run without --resume, a --resume with nothing to resume or
        with other settings; the checkpoint's bytes when resuming."""
        out = self.out
        # torchrun --max-restarts N with --resume from the start: the first attempt starts the run.
        restartable = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
        checkpoint, config_path = out / CHECKPOINT, out / CONFIG
        try:
            if resume and not out.exists() and not restartable:
                raise UsageError(f"--resume: {out} does not exist, so there is no run to continue (check --out)")
            self.lock = RunLock(out).acquire()
            remove_temp_files(out, RUN_FILES)
            if not resume:
                if checkpoint.exists() or (out / METRICS).exists():
                    raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
                return None
            if not checkpoint.exists():
                if not config_path.exists() and not restartable:
                    raise UsageError(f"--resume: {out} holds no run ({CONFIG} and {CHECKPOINT} are missing)")
                if config_path.exists():
                    note(f"{out} has no checkpoint yet (stopped in its first epoch): starting the run from epoch 1")
                return None
            saved = with_defaults(read_json(config_path)) if config_path.exists() else {}
            # Everything but the epoch budget must match, or the resumed run would silently differ.
            changed = settings_changed(saved, config)
            if changed:
                raise UsageError(f"--resume with a different {', '.join(option_names(changed))} than the run in "
                                 f"{out}")
            raw = checkpoint.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot use {out} as a run folder: {describe_os_error(e)}") from None
        self._parsed = self.parse(raw)
        trained = self._parsed.get("config")  # checkpoints before this check was made hold none
        if isinstance(trained, dict) and not saved:  # config.json lost: the command line must match the checkpoint
            changed = settings_changed(with_defaults(trained), config)
            if changed:
                raise UsageError(f"--resume with a different {', '.join(option_names(changed))} than the run in "
                                 f"{out} (its checkpoint)")
        elif isinstance(trained, dict):
            edited = settings_changed(with_defaults(trained), saved)
            if edited:
                first = edited[0]
                raise UsageError(f"cannot resume {out}: {CONFIG} says {first} = {saved[first]!r} but its checkpoint "
                                 f"was trained with {trained[first]!r} ({', '.join(edited)} differ); {CONFIG} was "
                                 "edited: restore it, or start a new run with the new settings")
        planned = saved.get("epochs", epochs)
        if isinstance(planned, bool) or not isinstance(planned, int):
            raise UsageError(f"{config_path}: epochs is {planned!r}, not a whole number; write it as one")
        self.check_budget(epochs, schedule, planned, self._parsed["epoch"])
        return raw

    def check_budget(self, epochs: int, schedule: str, planned: int, done: int) -> None:
        """A resumed run may change its number of epochs only where that changes nothing already trained."""
        if epochs == planned:
            return
        if epochs < done:
            raise UsageError(f"--resume with --epochs {epochs}, but the run in {self.out} has already trained "
                             f"{done} epochs")
        if schedule != "constant":
            raise UsageError(f"--resume with --epochs {epochs}, but the run in {self.out} was started with "
                             f"--epochs {planned} and its {schedule} schedule depends on that total; keep "
                             f"--epochs {planned} or start a new run")
        # Constant schedule (warm-up included): the learning rate of every step is independent of the total.
        note(f"{self.out}: the run's budget changes from {planned} to {epochs} epochs "
             "(exact: the constant schedule does not depend on the total)")

    def parse(self, raw: bytes) -> dict[str, Any]:
        """A checkpoint's state, checked to be one bpfree wrote (loaded with weights_only=True: no code runs)."""
        if self._parsed is not None:
            return self._parsed
        path = self.out / CHECKPOINT
        if not raw:
            raise UsageError(f"cannot resume from {path}: the file is empty; delete it to start the run again")
        try:
            state = torch.load(io.BytesIO(raw), map_location=self.device, weights_only=True)
        except Exception as e:  # torch reports a damaged or foreign file with many exception types
            raise UsageError(f"cannot resume from {path}: not a readable checkpoint ({describe_load_error(e)})") \
                from None
        keys = ("epoch", "model", "optimizer", "schedule", "estimator", "rng")
        missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
        if missing:
            raise UsageError(f"cannot resume from {path}: not a bpfree checkpoint (no {', '.join(missing)})")
        if not isinstance(state["epoch"], int) or state["epoch"] < 0:
            raise UsageError(f"cannot resume from {path}: its epoch is {state['epoch']!r}")
        if "records" not in state or not isinstance(state["estimator"], dict) or "parts" not in state["estimator"]:
            raise UsageError(f"cannot resume from {path}: it was made by an older bpfree (0.1), whose checkpoints "
                             "this version does not read; start a new run")
        return state

    def forget_parsed(self) -> None:
        """Drop the state parsed while checking (it is loaded once)."""
        self._parsed = None

    def start(self, config: dict[str, Any], records: list[dict[str, Any]], epoch: int) -> None:
        """Rank 0, before the first epoch of this session: config.json, metrics.jsonl as the checkpoint has it."""
        try:
            atomic_write_bytes(self.out / CONFIG, lambda f: f.write(json.dumps(config, indent=2).encode()))
            if epoch > 0 or (self.out / METRICS).exists():
                write_lines(self.out / METRICS, records)
            (self.out / FAILED).unlink(missing_ok=True)  # a resumed run is trying again
        except OSError as e:
            raise UsageError(f"cannot write the run folder: {describe_os_error(e, self.out)}") from None

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.out / CHECKPOINT, lambda f: torch.save(state, f))

    def save_epoch(self, save_checkpoint: Any, record: dict[str, Any], epoch: int) -> None:
        """Rank 0: the checkpoint (`save_checkpoint()`), then the metrics line. SIGINT / SIGTERM wait until both are
        on disk."""
        with signals_deferred():
            try:
                save_checkpoint()
                append_line(self.out / METRICS, record)
            except OSError as e:
                raise UsageError(f"cannot save epoch {epoch}: {describe_os_error(e, self.out)}") from None

    def fail(self, config: dict[str, Any], kind: str, error: str, detail: str = "") -> None:
        """Rank 0: failed.json, so `report` can tell a failed run from an unfinished one."""
        if self.group.is_main:
            record_failure(self.out, config, kind, error, detail)

    def close(self) -> None:
        """Release the run folder (rank 0): temp files of interrupted writes removed, then the lock."""
        if self.lock is not None:
            try:
                remove_temp_files(self.out, RUN_FILES)
            except OSError:
                pass  # the next run removes them
            self.lock.release()
            self.lock = None
