"""The training engine: data -> model -> estimator (fills .grad) -> torch.optim optimizer -> metrics, checkpoints.

It knows nothing of any method's internals: it calls `estimator.step`, `estimator.predict` and the estimator's
`state_dict`/`load_state_dict`, whatever the method.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bpfree import data as datasets
from bpfree import distributed, methods, models
from bpfree.errors import DivergedError, UsageError
from bpfree.memory import measured_step
from bpfree.runfolder import (
    RunLock,
    append_line,
    atomic_write_bytes,
    describe_load_error,
    describe_os_error,
    first_line,
    read_json,
    read_metrics,
    remove_temp_files,
    signals_deferred,
    write_lines,
)
from bpfree.transfer import load_backbone

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
FAILED = "failed.json"  # written when a run diverges (by `compare` also when it fails otherwise)
RUN_FILES = (CHECKPOINT, METRICS, CONFIG, FAILED)  # written atomically (temp files are cleaned up on start and exit)


def note(message: str) -> None:
    """A one-line notice on stderr (not an error)."""
    print(f"bpfree: {message}", file=sys.stderr, flush=True)


@dataclass
class TrainConfig:
    method: str = "bp"
    model: str = "mlp"
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/latest"
    resume: bool = False
    train_size: int | None = None
    val_split: int = 0  # training examples held out for validation (the same ones for every seed; see load_data)
    classes: tuple[int, ...] | None = None  # train and test on these labels only, relabelled 0..k-1
    init_from: str | None = None  # copy a trained backbone from this checkpoint (classifier heads stay new)
    data_root: str | None = None
    augment: bool = False
    eval_batch_size: int = 1000
    dist_timeout: float = 60.0  # data-parallel runs: seconds before a rank gives up on a silent peer
    method_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    blocks: tuple[str, ...] | None = None  # the model's submodules whose outputs are the block boundaries
    recipe: dict[str, Any] | None = None  # which recipes.py entry filled the settings not given (CLI runs)
    lr_auto: bool = False  # --lr auto: the lr finder (bpfree/lrfind.py) sets lr before training; lr is its prior
    lr_probe: dict[str, Any] | None = None  # what the finder probed and chose (config.json; --resume reuses it)

    def check(self) -> None:
        """Reject bad numbers and impossible combinations with one line each."""
        from bpfree.checks import check_device, check_seed  # shared with the other commands

        if self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        check_seed(self.seed)
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise UsageError(f"--weight-decay must be non-negative, got {self.weight_decay}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise UsageError(f"--warmup-epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r} (choose from: {', '.join(OPTIMIZERS)})")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r} (choose from: {', '.join(SCHEDULES)})")
        if not self.dist_timeout > 0:
            raise UsageError(f"--dist-timeout must be positive, got {self.dist_timeout}")
        if self.train_size is not None and self.train_size < 1:
            raise UsageError(f"--train-size must be at least 1, got {self.train_size}")
        if self.val_split < 0:
            raise UsageError(f"--val-split must be 0 (none) or a number of examples, got {self.val_split}")
        check_device(self.device)
        methods.METHODS.get(self.method)
        models.check(self.model)


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")


def make_optimizer(
    cfg: TrainConfig, params: list[torch.nn.Parameter], lr_multipliers: dict[int, float] | None = None
) -> torch.optim.Optimizer:
    """Weight decay on weights (>= 2 dims) only, as in the papers.

    lr_multipliers maps id(parameter) to a learning-rate multiplier (absent: 1). One parameter group per
    (multiplier, decay) pair, the multiplier-1 groups first (group 0's lr is the one logged). A run without
    multipliers has the same two groups as before, so older checkpoints still load.
    """
    mult = lr_multipliers or {}
    keys: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for p in params:
        keys.setdefault((mult.get(id(p), 1.0), p.dim() >= 2), []).append(p)
    order = sorted(keys, key=lambda k: (k[0] != 1.0, k[0], not k[1]))
    groups = [{"params": keys[k], "weight_decay": cfg.weight_decay if k[1] else 0.0, "lr": cfg.lr * k[0]}
              for k in order]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr)


def lr_multipliers_by_id(estimator: methods.Estimator) -> dict[int, float]:
    """The estimator's learning-rate multipliers keyed by id(parameter), for make_optimizer."""
    out = {}
    for params, m in estimator.lr_multipliers():
        if not (m >= 0 and math.isfinite(m)):
            raise UsageError(f"a learning-rate multiplier must be a non-negative number, got {m}")
        out.update({id(p): float(m) for p in params})
    return out


def make_schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step linear warm-up, then constant or cosine decay to zero."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict[str, Any]:
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
    for key, registry, name in (("method_options", methods.METHODS, "method"),
                                ("model_options", models.MODELS, "model")):
        entry = registry.entries.get(config.get(name, ""))
        if entry is not None and isinstance(config.get(key), dict):
            defaults = json.loads(json.dumps({k: o.default for k, o in entry.options.items()}))
            out[key] = {**defaults, **config[key]}
    return out


# Settings that may differ on --resume: the epoch budget (checked apart) and where and how the run is kept.
RESUME_FREE = ("epochs", "resume", "device", "out", "data_root", "dist_timeout", "recipe")


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


def load_data(cfg: TrainConfig):
    """The data set of a run, in this order: load, keep --classes (relabelled), hold out --val-split examples
    (drawn from the class-filtered training set by a constant seed), then keep the first --train-size of the rest.

    So the validation examples do not depend on --seed or --train-size, and never overlap the training examples.
    """
    # The label subset first, so --train-size and --val-split count examples of these classes.
    data = datasets.load(cfg.data, cfg.data_root, None if cfg.val_split else cfg.train_size, cfg.augment,
                         classes=cfg.classes)
    if cfg.val_split:
        if not hasattr(data, "hold_out"):
            raise UsageError(f"--val-split is not available for {cfg.data} (image folders: use a separate folder)")
        data = data.hold_out(cfg.val_split)
        if cfg.train_size:
            data = data.subset(cfg.train_size)
    return data


@torch.no_grad()
def evaluate(
    estimator: methods.Estimator, data, batch_size: int, device: torch.device,
    group: distributed.Group = distributed.LOCAL, split: str = "test",
) -> tuple[float, float]:
    """Error (%) and mean cross-entropy of the estimator's predictions on the test (or "val") set, its batches
    shared among ranks."""
    estimator.model.eval()
    wrong, total, loss = 0, 0, 0.0
    batches = data.val_batches(batch_size) if split == "val" else data.test_batches(batch_size)
    for i, (x, y) in enumerate(batches):
        if i % group.world_size != group.rank:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = estimator.predict(x)
        wrong += (logits.argmax(1) != y).sum().item()
        loss += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        total += len(y)
    wrong, total, loss = group.sum(torch.tensor([wrong, total, loss], dtype=torch.float64)).tolist()
    return 100.0 * wrong / total, loss / total


class Run:
    """Everything one training run holds; `train` drives it epoch by epoch.

    Rank 0 holds the run folder's lock from the start of `__init__` (so that a folder in use, or a bad --resume,
    is refused before any data is loaded) until `train` ends, however it ends, or `close` is called.
    """

    def __init__(self, cfg: TrainConfig, data=None, show_progress: bool | None = None, log_epochs: bool = False):
        cfg.check()
        self.cfg = cfg
        self.out = Path(cfg.out)
        # Launched by torchrun: join the process group; rank r trains on its share of every global batch.
        self.group, device = distributed.init_from_env(cfg.device, cfg.dist_timeout)
        self.device = torch.device(device)
        self.log_epochs = log_epochs and self.group.is_main
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress
        self.show_progress = self.show_progress and self.group.is_main
        self.lock: RunLock | None = None
        self.records: list[dict[str, Any]] = []  # every epoch's metrics record, also those of earlier sessions
        self.epoch = 0
        self._checked: dict[str, Any] | None = None  # rank 0: the checkpoint state checked before resuming
        self._rank_states: list[dict[str, Any]] | None = None  # data-parallel: every rank's RNG states, for rank 0
        self.step_peak_mb: float | None = None  # the activation peak of an epoch's first step (bpfree.memory)
        try:
            resume_from = self.open_run_folder()
            self._build(data)
            if resume_from is not None:
                self.load_checkpoint(resume_from)
        except BaseException:
            self.close()
            raise

    def _build(self, data) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.data = load_data(cfg) if data is None else data
        self.model = models.build(
            cfg.model, num_classes=self.data.num_classes, input_shape=self.data.input_shape, **cfg.model_options
        ).to(self.device)
        if cfg.init_from and not cfg.resume:
            load_backbone(self.model, cfg.init_from)  # before the estimator: method-owned heads start new
        self.group.broadcast_module(self.model)
        self.estimator = methods.build(cfg.method, self.model, seed=cfg.seed, blocks=cfg.blocks, **cfg.method_options)
        self.estimator.group = self.group
        self.optimizer = make_optimizer(cfg, self.estimator.trainable(), lr_multipliers_by_id(self.estimator))
        self.steps_per_epoch = self.data.num_train_batches(cfg.batch_size)
        if self.group.active and cfg.batch_size < self.group.world_size:
            raise UsageError(f"--batch-size {cfg.batch_size} is smaller than the {self.group.world_size} ranks "
                             f"(--nproc {self.group.world_size})")
        self.schedule = make_schedule(cfg, self.optimizer, self.steps_per_epoch)

    # -- persistence -------------------------------------------------------------------------------------------
    # Every epoch rank 0 first writes the checkpoint, which holds the metrics records of all epochs so far,
    # atomically, and then appends the epoch's line to metrics.jsonl. Whatever a kill interrupts, the checkpoint
    # covers every line on disk; a resume rewrites metrics.jsonl from the checkpoint's records, so no epoch is lost
    # (a torn last line is restored) or doubled. A kill before the first checkpoint leaves no run to resume: the
    # run starts again from epoch 1.
    def save_checkpoint(self) -> None:
        state = {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "estimator": self.estimator.state_dict(),
            "rng": rng_state(),
            "records": self.records,
            "config": self.stored_config(),  # what trained it: a hand-edited config.json cannot pass for it
        }
        if self._rank_states is not None:
            state["rank_states"] = self._rank_states
        atomic_write_bytes(self.out / CHECKPOINT, lambda f: torch.save(state, f))

    def save_epoch(self, record: dict[str, Any]) -> None:
        """Rank 0: the checkpoint, then the metrics line. SIGINT / SIGTERM wait until both are on disk."""
        with signals_deferred():
            try:
                self.save_checkpoint()
                append_line(self.out / METRICS, record)
            except OSError as e:
                raise UsageError(f"cannot save epoch {self.epoch}: {describe_os_error(e, self.out)}") from None

    def parse_checkpoint(self, raw: bytes) -> dict[str, Any]:
        """A checkpoint's state, checked to be one bpfree wrote (loaded with weights_only=True: no code runs)."""
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
        return state

    def load_checkpoint(self, raw: bytes) -> None:
        """Every rank resumes from rank 0's checkpoint (sent over the group: ranks need not share a file system)."""
        state = self._checked if self._checked is not None else self.parse_checkpoint(raw)
        self._checked = None
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.estimator.load_state_dict(state["estimator"])
            set_rng_state(state["rng"])
            own = state.get("rank_states")
            if own is not None and len(own) == self.group.world_size:  # this rank's random streams, not rank 0's
                set_rng_state(own[self.group.rank]["rng"])
                self.estimator.generator.set_state(own[self.group.rank]["generator"])
        except Exception as e:  # a checkpoint of another model or method: torch raises several kinds
            raise UsageError(f"cannot resume from {self.out / CHECKPOINT}: it does not fit this run "
                             f"({type(e).__name__}: {first_line(e)[:200]})") from None
        self.epoch = state["epoch"]
        if "records" in state:
            self.records = list(state["records"])
        elif self.group.is_main:  # a checkpoint from before records were kept in it: the metrics it covers
            self.records = [r for r in read_metrics(self.out / METRICS) if r["epoch"] <= self.epoch]

    def open_run_folder(self) -> bytes | None:
        """Rank 0 locks and checks the run folder; every rank learns the verdict: an error, or the checkpoint to
        resume from (None: a fresh start). Broadcast, so that no rank hangs on an error found by rank 0."""
        error, raw = None, None
        if self.group.is_main:
            try:
                raw = self._check_run_folder()
            except UsageError as e:
                error = e
        self.group.broadcast_error(error)
        if self.group.broadcast_bytes(b"0" if raw is None else b"1") == b"0":
            return None
        return self.group.broadcast_bytes(raw)

    def _check_run_folder(self) -> bytes | None:
        """Rank 0: refuse a folder in use, an existing run without --resume, a --resume with nothing to resume or
        with other settings; the checkpoint's bytes when resuming."""
        cfg, out = self.cfg, self.out
        # torchrun --max-restarts N with --resume from the start: the first attempt starts the run.
        restartable = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
        checkpoint, config_path = out / CHECKPOINT, out / CONFIG
        try:
            if cfg.resume and not out.exists() and not restartable:
                raise UsageError(f"--resume: {out} does not exist, so there is no run to continue (check --out)")
            self.lock = RunLock(out).acquire()
            remove_temp_files(out, RUN_FILES)
            if not cfg.resume:
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
            config = self.stored_config()
            # Everything but the epoch budget must match, or the resumed run would silently differ.
            changed = settings_changed(saved, config)
            if changed:
                raise UsageError(f"--resume with a different {', '.join(option_names(changed))} than the run in "
                                 f"{out}")
            raw = checkpoint.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot use {out} as a run folder: {describe_os_error(e)}") from None
        self._checked = self.parse_checkpoint(raw)  # loaded once: load_checkpoint uses it
        trained = self._checked.get("config")  # checkpoints before this check was made hold none
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
        planned = saved.get("epochs", cfg.epochs)
        if isinstance(planned, bool) or not isinstance(planned, int):
            raise UsageError(f"{config_path}: epochs is {planned!r}, not a whole number; write it as one")
        self.check_budget(planned, self._checked["epoch"])
        return raw

    def check_budget(self, planned: int, done: int) -> None:
        """A resumed run may change its number of epochs only where that changes nothing already trained."""
        epochs, schedule = self.cfg.epochs, self.cfg.schedule
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

    def stored_config(self) -> dict[str, Any]:
        """The config as config.json stores it (tuples become lists); world_size: a resumed run keeps its ranks."""
        return with_defaults(json.loads(json.dumps({**asdict(self.cfg), "resume": False,
                                                    "world_size": self.group.world_size})))

    def write_run_folder(self) -> None:
        """Rank 0, before the first epoch of this session: config.json, metrics.jsonl as the checkpoint has it."""
        config = self.stored_config()
        try:
            atomic_write_bytes(self.out / CONFIG, lambda f: f.write(json.dumps(config, indent=2).encode()))
            if self.epoch > 0 or (self.out / METRICS).exists():
                write_lines(self.out / METRICS, self.records)
            (self.out / FAILED).unlink(missing_ok=True)  # a resumed run is trying again
        except OSError as e:
            raise UsageError(f"cannot write the run folder: {describe_os_error(e, self.out)}") from None

    def close(self) -> None:
        """Release the run folder (rank 0): temp files of interrupted writes removed, then the lock."""
        if self.lock is not None:
            try:
                remove_temp_files(self.out, RUN_FILES)
            except OSError:
                pass  # the next run removes them
            self.lock.release()
            self.lock = None

    # -- training --------------------------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch)  # shuffle + augmentation
        loss_sum = torch.zeros((), dtype=torch.float64)
        wrong = torch.zeros((), dtype=torch.int64)
        seen = 0
        extras: dict[str, float] = {}
        group, sent = self.group, self.group.bytes
        shard = {"rank": group.rank, "world_size": group.world_size} if group.active else {}
        batches = tqdm(islice(self.data.train_batches(cfg.batch_size, generator, **shard), self.steps_per_epoch),
                       total=self.steps_per_epoch,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not self.show_progress, leave=False)
        for step, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            n = len(y)
            if group.active:  # this rank's rows of the global batch; 0 examples counted where it had no share
                rows = distributed.shard(min(cfg.batch_size, self.data.num_train - step * cfg.batch_size),
                                         group.rank, group.world_size)
                self.estimator.shard, n = rows, rows.weight
            self.optimizer.zero_grad(set_to_none=True)
            try:
                # The epoch's figure for peak_memory_mb (measuring slows this one step on CPU). Not in CPU
                # data-parallel runs: the profiler is not run while gloo's threads move tensors (heap corruption
                # was seen when it did, in staged runs).
                if step == 0 and not (group.active and self.device.type == "cpu"):
                    result, self.step_peak_mb = measured_step(self.estimator, x, y)
                else:
                    result = self.estimator.step(x, y)
            except DivergedError as e:  # an estimator found non-finite values of its own (e.g. ff's scores)
                raise self.diverged(str(e), step) from None
            if not torch.isfinite(result.loss):
                raise self.diverged(f"loss became {result.loss.item()}", step)
            if group.active:  # every rank now holds the update of the whole global batch (the estimator's policy)
                self.estimator.all_reduce_gradients(group, n)
                distributed.reduce_state(group, self.estimator.reduced_state(), self.model, n)
            self.optimizer.step()
            self.schedule.step()
            loss_sum += result.loss.detach().double().cpu() * n
            if n:
                wrong += (result.logits.argmax(1) != y).sum().cpu()
            seen += n
            for k, v in (result.extra or {}).items():
                extras[k] = extras.get(k, 0.0) + float(v) * n
            if self.show_progress and step % 10 == 0:
                batches.set_postfix(loss=f"{loss_sum.item() / seen:.4f}")
        keys = sorted(extras)
        totals = torch.tensor([loss_sum.item(), wrong.item(), seen, *(extras[k] for k in keys)], dtype=torch.float64)
        loss_total, wrong_total, seen_total, *rest = group.sum(totals).tolist()  # the global batch: sums over ranks
        record = {"train_loss": loss_total / seen_total, "train_error": 100.0 * wrong_total / seen_total,
                  **{k: v / seen_total for k, v in zip(keys, rest)}}
        if group.active:
            record["comm_bytes_per_step"] = (group.bytes - sent) / (step + 1)
        return record

    def diverged(self, what: str, step: int) -> DivergedError:
        kept = (f"the checkpoint of epoch {self.epoch} is kept in {self.out / CHECKPOINT}" if self.epoch
                else "no checkpoint was written (the first epoch had not finished)")
        return DivergedError(f"{what} at epoch {self.epoch + 1}, step {step + 1}; {kept}; {lr_origin(self.cfg)} "
                             "(try a lower --lr)")

    def train(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns every epoch's metrics record (earlier sessions' too)."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> list[dict[str, Any]]:
        cfg = self.cfg
        if self.group.is_main:
            self.write_run_folder()
        while self.epoch < cfg.epochs:
            start = time.perf_counter()
            try:
                record = self.train_epoch()
            except DivergedError as e:
                if self.group.is_main:  # so `report` can tell a diverged run from an unfinished one
                    record_failure(self.out, asdict(cfg), "diverged", f"diverged at epoch {self.epoch + 1}", str(e))
                raise
            seconds = time.perf_counter() - start
            if cfg.val_split:
                val_error, val_loss = evaluate(self.estimator, self.data, cfg.eval_batch_size, self.device,
                                               self.group, split="val")
                record.update(val_error=val_error, val_loss=val_loss)
            test_error, test_loss = evaluate(self.estimator, self.data, cfg.eval_batch_size, self.device, self.group)
            self.epoch += 1
            record = {"epoch": self.epoch, **record, "test_error": test_error, "test_loss": test_loss,
                      "seconds": seconds, "lr": self.optimizer.param_groups[0]["lr"],
                      **({"peak_memory_mb": self.step_peak_mb} if self.step_peak_mb is not None else {})}
            self.records.append(record)
            self._rank_states = distributed.gather_rng_states(self.group, rng_state, self.estimator.generator)
            if self.group.is_main:
                self.save_epoch(record)
            if self.log_epochs:
                val = f"val error {record['val_error']:.2f} %, " if cfg.val_split else ""
                tqdm.write(f"epoch {self.epoch}: train loss {record['train_loss']:.4f}, "
                           f"train error {record['train_error']:.2f} %, {val}test error {test_error:.2f} % "
                           f"({seconds:.1f} s)", file=sys.stderr)
        return list(self.records)


def lr_origin(cfg: TrainConfig) -> str:
    """How the run's learning rate was chosen, for the divergence message."""
    recipe = cfg.recipe or {}
    if cfg.lr_probe is not None:
        how = "the lr finder's choice (lr_probe in config.json)" if cfg.lr_probe.get("grid") else \
            "the rule's prior (the finder's budget was too small to probe)"
    elif "lr" in recipe.get("overridden", ()) or not recipe:
        how = "given with --lr"
    else:
        how = f"from the recipe {recipe.get('entry')}"
    return f"lr {cfg.lr:g} was {how}"


def train(
    cfg: TrainConfig, data=None, show_progress: bool | None = None, log_epochs: bool = False
) -> list[dict[str, Any]]:
    """Train (or resume) one run; returns all epochs' metrics records (launched by torchrun: data-parallel)."""
    if cfg.lr_auto:  # --lr auto: choose the learning rate first (the recorded choice when resuming)
        from bpfree import lrfind  # it builds on this module

        lrfind.resolve(cfg, data, show_progress)
    run = Run(cfg, data=data, show_progress=show_progress, log_epochs=log_epochs)
    records = run.train()
    distributed.shutdown(run.group)
    return records
