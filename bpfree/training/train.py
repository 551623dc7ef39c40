"""The training engine: data -> model -> estimator (fills .grad) -> torch.optim optimizer -> metrics, checkpoints.

It knows nothing of any method's internals: it calls `estimator.step`, `estimator.predict` and the estimator's
`state_dict`/`load_state_dict`, whatever the method.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bpfree import data as datasets
from bpfree import methods, models
from bpfree.core.errors import DivergedError, UsageError
from bpfree.core.group import LOCAL, Group, shard
from bpfree.core.memory import measured_step
from bpfree.training import distributed
from bpfree.training.checkpoint import (
    CHECKPOINT,
    RunFolder,
    rng_state,
    set_rng_state,
    with_defaults,
)
from bpfree.training.config import TrainConfig
from bpfree.training.runfolder import first_line
from bpfree.training.transfer import load_backbone


def make_optimizer(
    cfg: TrainConfig, params: list[torch.nn.Parameter], lr_multipliers: dict[int, float] | None = None
) -> torch.optim.Optimizer:
    """Weight decay on weights (>= 2 dims) only, as in the papers.

    lr_multipliers maps id(parameter) to a learning-rate multiplier (absent: 1). One parameter group per
    (multiplier, decay) pair, the multiplier-1 groups first (group 0's lr is the one logged).
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
    """Per-step linear warm-up (--warmup-epochs plus --warmup-fraction of the run), then constant or cosine decay
    to zero."""
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch + cfg.warmup_fraction * total

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    group: Group = LOCAL, split: str = "test",
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
    """One training run: built from its config, resumed from its folder if asked, trained epoch by epoch.

    The run folder (lock, resume checks, config.json, checkpoints, metrics lines, failed.json) is `self.folder`
    (bpfree.training.checkpoint); rank 0 holds its lock from the start of `__init__`, so that a folder in use or a
    bad --resume is refused before any data is loaded, until `train` ends, however it ends, or `close` is called.
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
        self.folder = RunFolder(self.out, self.group, self.device)
        self.records: list[dict[str, Any]] = []  # every epoch's metrics record, also those of earlier sessions
        self.epoch = 0
        self._rank_states: list[dict[str, Any]] | None = None  # data-parallel: every rank's RNG states, for rank 0
        self.step_peak_mb: float | None = None  # the activation peak of an epoch's first step (bpfree.core.memory)
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

    # -- the run folder (bpfree.training.checkpoint) ----------------------------------------------------------------
    def open_run_folder(self) -> bytes | None:
        schedule = self.cfg.schedule
        if self.cfg.warmup_fraction:  # its warm-up's length depends on the total
            schedule = f"{schedule} (warm-up over {self.cfg.warmup_fraction:g} of the run)"
        return self.folder.open(self.stored_config(), self.cfg.resume, self.cfg.epochs, schedule)

    def parse_checkpoint(self, raw: bytes) -> dict[str, Any]:
        return self.folder.parse(raw)

    def stored_config(self) -> dict[str, Any]:
        """The config as config.json stores it (tuples become lists); world_size: a resumed run keeps its ranks."""
        return with_defaults(json.loads(json.dumps({**asdict(self.cfg), "resume": False,
                                                    "world_size": self.group.world_size})))

    def write_run_folder(self) -> None:
        self.folder.start(self.stored_config(), self.records, self.epoch)

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
        self.folder.save_checkpoint(state)

    def load_checkpoint(self, raw: bytes) -> None:
        """Every rank resumes from rank 0's checkpoint (sent over the group: ranks need not share a file system)."""
        state = self.parse_checkpoint(raw)
        self.folder.forget_parsed()
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
        except UsageError:
            raise
        except Exception as e:  # a checkpoint of another model or method: torch raises several kinds
            raise UsageError(f"cannot resume from {self.out / CHECKPOINT}: it does not fit this run "
                             f"({type(e).__name__}: {first_line(e)[:200]})") from None
        self.epoch = state["epoch"]
        self.records = list(state["records"])

    def close(self) -> None:
        self.folder.close()

    # -- training --------------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns every epoch's metrics record (earlier sessions' too)."""
        try:
            if self.group.is_main:
                self.write_run_folder()
            while self.epoch < self.cfg.epochs:
                self.train_and_evaluate_epoch()
            return list(self.records)
        finally:
            self.close()

    def train_and_evaluate_epoch(self) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        try:
            record = self.train_epoch()
        except DivergedError as e:
            self.folder.fail(asdict(cfg), "diverged", f"diverged at epoch {self.epoch + 1}", str(e))
            raise
        seconds = time.perf_counter() - start
        if cfg.val_split:
            val_error, val_loss = evaluate(self.estimator, self.data, cfg.eval_batch_size, self.device, self.group,
                                           split="val")
            record.update(val_error=val_error, val_loss=val_loss)
        test_error, test_loss = evaluate(self.estimator, self.data, cfg.eval_batch_size, self.device, self.group)
        self.epoch += 1
        record = {"epoch": self.epoch, **record, "test_error": test_error, "test_loss": test_loss,
                  "seconds": seconds, "lr": self.optimizer.param_groups[0]["lr"],
                  **({"peak_memory_mb": self.step_peak_mb} if self.step_peak_mb is not None else {})}
        self.records.append(record)
        self._rank_states = distributed.gather_rng_states(self.group, rng_state, self.estimator.generator)
        if self.group.is_main:
            self.folder.save_epoch(self.save_checkpoint, record, self.epoch)
        if self.log_epochs:
            val = f"val error {record['val_error']:.2f} %, " if cfg.val_split else ""
            tqdm.write(f"epoch {self.epoch}: train loss {record['train_loss']:.4f}, "
                       f"train error {record['train_error']:.2f} %, {val}test error {test_error:.2f} % "
                       f"({seconds:.1f} s)", file=sys.stderr)

    def train_epoch(self) -> dict[str, float]:
        cfg, group = self.cfg, self.group
        self.model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch)  # shuffle + augmentation
        totals = {"loss": 0.0, "wrong": 0, "seen": 0}
        extras: dict[str, float] = {}
        sent = group.bytes
        shard = {"rank": group.rank, "world_size": group.world_size} if group.active else {}
        batches = tqdm(islice(self.data.train_batches(cfg.batch_size, generator, **shard), self.steps_per_epoch),
                       total=self.steps_per_epoch,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not self.show_progress, leave=False)
        steps = 0
        for step, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            result, n = self.train_step(step, x, y)
            steps += 1
            totals["loss"] += result.loss.detach().double().item() * n
            totals["wrong"] += int((result.logits.argmax(1) != y).sum()) if n else 0
            totals["seen"] += n
            for k, v in (result.extra or {}).items():
                extras[k] = extras.get(k, 0.0) + float(v) * n
            if self.show_progress and step % 10 == 0:
                batches.set_postfix(loss=f"{totals['loss'] / max(totals['seen'], 1):.4f}")
        keys = sorted(extras)
        sums = torch.tensor([totals["loss"], totals["wrong"], totals["seen"], *(extras[k] for k in keys)],
                            dtype=torch.float64)
        loss_total, wrong_total, seen_total, *rest = group.sum(sums).tolist()  # the global batch: sums over ranks
        record = {"train_loss": loss_total / seen_total, "train_error": 100.0 * wrong_total / seen_total,
                  **{k: v / seen_total for k, v in zip(keys, rest)}}
        if group.active:
            record["comm_bytes_per_step"] = (group.bytes - sent) / steps
        return record

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[methods.StepResult, int]:
        """The estimator fills p.grad, the ranks combine, the optimizer steps; (the result, examples counted)."""
        cfg, group, n = self.cfg, self.group, len(y)
        if group.active:  # this rank's rows of the global batch; 0 examples counted where it had no share
            rows = shard(min(cfg.batch_size, self.data.num_train - step * cfg.batch_size),
                                     group.rank, group.world_size)
            self.estimator.shard, n = rows, rows.weight
        self.optimizer.zero_grad(set_to_none=True)
        try:
            # The epoch's figure for peak_memory_mb (measuring slows this one step on CPU). Not in CPU data-parallel
            # runs: the profiler is not run while gloo's threads move tensors (heap corruption was seen).
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
        return result, n

    def diverged(self, what: str, step: int) -> DivergedError:
        kept = (f"the checkpoint of epoch {self.epoch} is kept in {self.out / CHECKPOINT}" if self.epoch
                else "no checkpoint was written (the first epoch had not finished)")
        return DivergedError(f"{what} at epoch {self.epoch + 1}, step {step + 1}; {kept}; {lr_origin(self.cfg)} "
                             "(try a lower --lr)")


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
    from bpfree.training import lrfind  # it builds on this module

    if cfg.stages > 1:
        raise UsageError("--stages: each stage is a process; launch with `bpfree train --stages S` "
                         "(or bpfree.training.stages.train in each)")
    group = lrfind.resolve_joined(cfg, data, show_progress)  # --lr auto: the rate first (the recorded one on resume)
    run = Run(cfg, data=data, show_progress=show_progress, log_epochs=log_epochs)
    records = run.train()
    distributed.shutdown(run.group)
    distributed.shutdown(group)  # the group joined for the probe (Run's own then did not create one)
    return records
