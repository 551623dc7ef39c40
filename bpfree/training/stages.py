"""Block-parallel training: `bpfree train --stages S` trains S contiguous groups of a model's blocks at once, one
process each, on torch.distributed (gloo on CPU, NCCL on CUDA), for the local rules, dfa, fdfa, fg-a and fg-w.

Every process builds the same model and the same estimator (same seed: same initialisation, heads, feedback
matrices and random streams) and runs the rule's own `step` unchanged. What makes a process a *stage* is how the
model's forward runs while it steps (`running_stage`):

- the modules of the blocks outside the stage are stubbed (`anatomy.forwards_replaced`): they return zeros of the
  shape a probe pass recorded, so they cost almost nothing;
- the output of the block before the stage is replaced by the activation received from the previous stage
  (point-to-point `recv`), and the output of the stage's last block is sent to the next stage (`isend`) as it is
  computed. The rule's own boundary hooks run after these, on the true values.

The local rules learn each block from its detached input, computed before the upstream update, and the optimizers
are per parameter, so a stage that steps only the parameters it owns while the next stage works on the previous
batch is *exactly* the one-process run (tests/training/test_stages.py). Nothing flows back. Each process reads the same
batches from its own data loader (same shuffle), so only activations travel; labels are read locally.

dfa, fdfa, fg-a and fg-w learn from the output error. Synchronously (the default), the last stage's loss and output
error reach every stage once per step (`shared_output_error`); fdfa's, fg-a's and fg-w's tangents ride forward beside
the activations and the last stage's output tangent is shared at the model's output, so these too equal one process.
Pipelined (`--stage-mode pipelined`, dfa, fdfa, fg-a and fg-w), stage s keeps the batches it ran and updates from
the signal the last stage sends for each (e; fdfa's e and ẏ; fg-a's and fg-w's directional derivatives) S-1-s steps
later, so no stage waits for it.

Why not the stage modules of `torch.distributed.pipelining.pipeline` (which does split resnet18, the example ViT
and ResidualCNN and keeps the block names): see docs/parallel.md. In short, the estimators are built on the whole
classifier (its anatomy, heads and random streams), sff calls blocks with `between=` and lg-fg-w calls the model by
parameter names; stubs keep every rule's code path as it is, so exactness holds by construction.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import nn

from bpfree import methods
from bpfree.core import tangents as T
from bpfree.core.anatomy import Anatomy
from bpfree.core.errors import UsageError
from bpfree.core.group import LOCAL
from bpfree.core.memory import measured_step
from bpfree.methods.base import StepResult, zero_missing_grads
from bpfree.methods.block_local import BlockLocal
from bpfree.methods.feedback_alignment import _DirectFeedback
from bpfree.methods.forward_forward import ScalableFF
from bpfree.methods.forward_gradient import ForwardGradientActivity, ForwardGradientWeight
from bpfree.training import distributed
from bpfree.training.checkpoint import CHECKPOINT, CONFIG, record_failure
from bpfree.training.checkpoint import rng_state as global_rng_state
from bpfree.training.checkpoint import set_rng_state as set_global_rng_state
from bpfree.training.config import STAGE_MODES
from bpfree.training.runfolder import atomic_write_bytes, describe_os_error
from bpfree.training.stage_links import Link, ProbeLink, late_signals_sent, running_stage, shared_output_error
from bpfree.training.stage_plan import (
    StagePlan,
    balanced_starts,
    named_starts,
    ownership,
    probe_stubs,
    profile_blocks,
    restored,
    stage_tensors,
    state_owners,
    unit_blocks,
)
from bpfree.training.stage_replicas import REPLICATED_RULES, SIGNAL_RULES, ReplicaGroup, StageReplicas
from bpfree.training.train import Run, TrainConfig, lr_multipliers_by_id, make_optimizer, make_schedule

STAGED_RULES = ("l-bp", "l-fa", "lg-bp", "lg-fa", "lg-fg-a", "lg-fg-w", "sff", "sff-block", "dfa", "fdfa", "fg-a",
                "fg-w")
# Rules whose blocks learn from the output error: every stage needs the last stage's error (and, for the rules whose
# tangents run through the whole model, its output tangent), synchronously or a few steps late (pipelined).
OUTPUT_ERROR_RULES = ("dfa", "fdfa", "fg-a", "fg-w")
# Rules whose forward-mode tangents cross the stage boundaries beside the activations.
CARRY_TANGENTS = ("fdfa", "fg-a", "fg-w")
MODES = STAGE_MODES
PIPELINED_RULES = ("dfa", "fdfa", "fg-a", "fg-w")
# bp and fa send errors back through every stage: they run through PyTorch's pipeline engine (pipeline_bp.py).
PIPELINE_RULES = ("bp", "fa")
# One line per rule that refuses --stages, saying why (docs/parallel.md: what is left).
REFUSED = {
    "ff": "hard and readout negatives score through every block, and ff's loss averages all blocks; use sff-block",
}


def check_stages(method: str, stages: int, nproc: int, split: Sequence[str] | None,
                 mode: str = "synchronous", options: Mapping[str, Any] | None = None,
                 microbatches: int | None = None, pipeline_schedule: str | None = None) -> None:
    """Refuse what --stages cannot do, before any process starts (one line each). `options`: the method's
    options; `microbatches`, `pipeline_schedule`: as given (None: not given)."""
    options = options or {}
    if (microbatches, pipeline_schedule) != (None, None) and (stages < 2 or method not in PIPELINE_RULES):
        raise UsageError("--microbatches and --pipeline-schedule are for bp and fa with --stages 2 or more "
                         f"(PyTorch's pipeline), not {method} with --stages {stages}")
    if pipeline_schedule == "1f1b" and microbatches is not None and microbatches < stages:
        raise UsageError(f"--pipeline-schedule 1f1b needs at least as many micro-batches as stages "
                         f"(--microbatches {microbatches}, --stages {stages}); use gpipe")
    if stages < 1:
        raise UsageError(f"--stages must be at least 1, got {stages}")
    if split is not None and stages == 1:
        raise UsageError("--stage-split needs --stages 2 or more")
    if mode not in MODES:
        raise UsageError(f"--stage-mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "synchronous" and stages == 1:
        raise UsageError("--stage-mode needs --stages 2 or more")
    if mode == "pipelined" and method not in PIPELINED_RULES:
        raise UsageError(f"--stage-mode pipelined is for {', '.join(PIPELINED_RULES)} (the local rules never wait "
                         f"for an error; {method} runs synchronously)")
    if mode == "pipelined" and options.get("recompute"):
        raise UsageError("--stage-mode pipelined keeps each stage's in-flight batches for their late error; "
                         "--recompute true is for the synchronous mode")
    if stages == 1:
        return
    if nproc > 1 and method not in REPLICATED_RULES:
        raise UsageError(f"--stages with --nproc (data-parallel replicas of each stage) is for "
                         f"{', '.join(REPLICATED_RULES)}; not {method} yet")
    if nproc > 1 and mode == "pipelined":
        raise UsageError("--stages with --nproc runs --stage-mode synchronous (a pipelined stage's late updates "
                         "are not averaged over its replicas yet)")
    if method in REFUSED:
        raise UsageError(f"--stages: {method} cannot be staged: {REFUSED[method]}")
    if method == "fg-a" and options.get("aggregation") == "orthogonal":
        raise UsageError("--stages: fg-a's orthogonal aggregation projects onto the span of every layer's "
                         "tangents, which no one stage sees; use --aggregation mean or sum")
    if method == "fg-w" and options.get("tangents", 1) > 1:
        raise UsageError("--stages: fg-w with --tangents > 1 differentiates the whole model in one "
                         "torch.func.jvp under vmap, which a received activation's K tangents cannot enter; "
                         "use --tangents 1, fg-a or lg-fg-w")
    if method not in STAGED_RULES and method not in PIPELINE_RULES:
        raise UsageError(f"--stages: {method} cannot be staged (staged rules: {', '.join(STAGED_RULES)})")
    if split is not None and len(split) != stages - 1:
        raise UsageError(f"--stage-split names the first block of stages 2..{stages}: {stages - 1} names, got "
                         f"{len(split)}")


def parse_split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UsageError("--stage-split: expected block names separated by commas")
    return names



# -- the staged run ---------------------------------------------------------------------------------------------

INDEXED = re.compile(r"(\d+)$")


@dataclass
class Tally:
    """One stage's sums over an epoch's steps."""

    loss: float = 0.0
    wrong: int = 0
    seen: int = 0
    extras: dict[str, float] = field(default_factory=dict)
    scores: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)


class StagedRun(Run):
    """A `Run` whose process is one stage of `--stages S` (rank r = stage r; with R replicas, replica r % R of stage
    r // R). Metrics, evaluation and checkpoints are of the whole model: at each epoch end the stages exchange the
    state they own, so every process holds the trained model, evaluates a share of the test set, and rank 0 writes
    one checkpoint for all stages."""

    def __init__(self, cfg: TrainConfig, replicas: int = 1, **kwargs: Any):
        self.stages, self.split_given, self.mode = cfg.stages, parse_split(cfg.stage_split), cfg.stage_mode
        check_stages(cfg.method, self.stages, replicas, self.split_given, self.mode, cfg.method_options)
        self.replicas = replicas  # --nproc: data-parallel copies of each stage (stage_replicas.py)
        self._resume_raw: bytes | None = None
        self._stage_states: list[bytes] | None = None
        super().__init__(cfg, **kwargs)

    # -- building -----------------------------------------------------------------------------------------------
    def open_run_folder(self) -> bytes | None:
        self._resume_raw = super().open_run_folder()
        return self._resume_raw

    def _build_whole(self, data: Any) -> None:
        """The whole model and estimator, as one process builds them, on every stage."""
        if self.group.world_size != self.stages * self.replicas:
            raise UsageError(f"--stages {self.stages} needs {self.stages * self.replicas} processes; "
                             f"{self.group.world_size} were started (launch with `bpfree train --stages S`)")
        Run._build(self, data)
        self.estimator.group = LOCAL  # not data-parallel: every stage draws the one-process random numbers

    def _place(self) -> None:
        """The split, this process's stage and replica, the stubs of the other stages' blocks, and which stage owns
        each parameter and piece of state."""
        est = self.estimator
        anatomy = est.anatomy
        if len(anatomy.blocks) < self.stages:
            raise UsageError(f"--stages {self.stages}: {type(self.model).__name__} has {len(anatomy.blocks)} blocks "
                             f"({est.blocks_hint()})")
        self.profile = self._profile()
        self.starts = self._choose_starts(anatomy)
        self.copies = StageReplicas(self.group, self.stages, self.replicas)
        self.plan = StagePlan(self.starts, len(anatomy.blocks), self.copies.stage)
        self.stubs = probe_stubs(est, self.plan)
        self.param_owner = ownership(est, self.starts)
        self.owners = state_owners(est, self.starts, self.param_owner)

    def _build(self, data: Any) -> None:
        self._build_whole(data)
        cfg, est = self.cfg, self.estimator
        # The hand-written MLP paths run no model forward; stages need the model's own (same numbers for dfa)
        if isinstance(est, _DirectFeedback):
            est.fast = None
        if isinstance(est, (ForwardGradientActivity, ForwardGradientWeight)):
            est.chain = None
        if not isinstance(est, (BlockLocal, ScalableFF, _DirectFeedback, ForwardGradientActivity,
                                ForwardGradientWeight)) or \
                methods.find_fast_path(cfg.method, self.model) is not None:
            raise UsageError(f"--stages: {cfg.method} on {type(self.model).__name__} runs a model-specific fast "
                             "path without block hooks; it cannot be staged")
        self._place()
        mine = {id(p) for p, s in zip(self.model.parameters(), self.param_owner) if s == self.plan.stage}
        heads = getattr(est, "heads", None)
        if isinstance(heads, nn.ModuleList):
            units = unit_blocks(est)
            mine |= {id(p) for k, h in enumerate(heads) if self.plan.owns(units[k]) for p in h.parameters()}
        self.owned_params = [p for p in est.trainable() if id(p) in mine]
        self.unit_stage = [self.plan.stage_of(b) for b in unit_blocks(est)]
        self.optimizer = make_optimizer(cfg, self.owned_params, lr_multipliers_by_id(est))
        self.schedule = make_schedule(cfg, self.optimizer, self.steps_per_epoch)
        self.link = Link(self.group, self.plan)
        self.link.peer, self.link.pipe = self.copies.peer, self.copies.pipe
        # the float buffers (batch-norm statistics) the stage's replicas average after each step, with its gradients
        self.owned_buffers = [b for k, b in stage_tensors(est).items() if self.owners.get(k) == self.plan.stage
                              and b.is_floating_point() and not isinstance(b, nn.Parameter)]
        self.peak_mb = self._stage_peak()

    def _stage_peak(self) -> float:
        """This stage's activation peak (MiB, `bpfree.core.memory`) in one step on the first batch, measured alone
        before training (the received activation stood in by zeros, nothing sent): the profiler is not run while
        gloo's threads move tensors."""
        x, y = next(iter(self.data.train_batches(self.cfg.batch_size, torch.Generator().manual_seed(0))))
        with restored(self.estimator), running_stage(self.estimator, self.plan, ProbeLink(None), self.stubs,
                                                     self.carry_tangents), self._own_updates_only():
            return measured_step(self.estimator, x.to(self.device), y.to(self.device))[1]

    @property
    def carry_tangents(self) -> bool:
        return self.cfg.method in CARRY_TANGENTS

    @contextmanager
    def _own_updates_only(self) -> Iterator[None]:
        """fg-a: a perturbed map whose parameters another stage owns is not turned into gradients here (its VJP
        would run through a stub); the others are formed exactly as in one process."""
        est = self.estimator
        if not isinstance(est, ForwardGradientActivity):
            yield
            return
        mine = {id(p) for p in self.owned_params}
        original = est._map_grads

        def map_grads(rec: Any, c: torch.Tensor) -> None:
            if any(id(p) in mine for p in rec.params):
                original(rec, c)

        est._map_grads = map_grads  # type: ignore[method-assign]
        try:
            yield
        finally:
            del est._map_grads

    def _profile(self) -> list[float]:
        """Each block's step seconds, measured by rank 0 on the first batch and sent to every stage."""
        seconds: list[float] = []
        if self.group.is_main:
            x, y = next(iter(self.data.train_batches(self.cfg.batch_size, torch.Generator().manual_seed(0))))
            est = self.estimator
            # dfa's one-pass step runs every block's backward after the whole forward; its recomputing step (the
            # same gradients) runs each block's backward at its boundary, where the profile can time it
            # (fg-a's likewise forms each map's gradient where the map runs)
            recompute = getattr(est, "recompute", None)
            recomputes = isinstance(est, (_DirectFeedback, ForwardGradientActivity))
            if recomputes:
                est.recompute = True
            try:
                seconds = profile_blocks(est, x.to(self.device), y.to(self.device))
            finally:
                if recomputes:
                    est.recompute = recompute
        return json.loads(self.group.broadcast_bytes(json.dumps(seconds).encode()).decode())

    def _choose_starts(self, anatomy: Anatomy) -> list[int]:
        """A resumed run keeps its stages; else --stage-split, else the balanced split of the profile."""
        if self._resume_raw is not None:
            state = self.parse_checkpoint(self._resume_raw)
            staged = state.get("stages")
            if not isinstance(staged, dict):
                raise UsageError(f"cannot resume {self.out} with --stages: it was trained in one process")
            return list(staged["starts"])
        if self.split_given:
            return named_starts(anatomy, self.split_given, self.stages)
        return balanced_starts(self.profile, self.stages)

    def stored_config(self) -> dict[str, Any]:
        return {**super().stored_config(), "world_size": self.replicas}

    def delay(self, stage: int) -> int:
        """Steps between a batch's forward on `stage` and the update from its error (pipelined: S-1-stage, the
        steps the last stage runs behind it)."""
        return self.stages - 1 - stage if self.mode == "pipelined" else 0

    def write_run_folder(self) -> None:
        super().write_run_folder()
        names = [b.name for b in self.estimator.anatomy.blocks]
        bounds = [*self.starts, len(names)]
        total = sum(self.profile) or 1.0
        config = {**self.stored_config(),
                  "stage_delays": [self.delay(s) for s in range(self.stages)],
                  "stage_split": ",".join(names[a] for a in self.starts[1:]),
                  "stage_blocks": [names[a:b] for a, b in zip(bounds, bounds[1:])],
                  "stage_profile": {"block_seconds": [round(s, 6) for s in self.profile],
                                    "stage_share": [round(sum(self.profile[a:b]) / total, 4)
                                                    for a, b in zip(bounds, bounds[1:])]}}
        try:
            atomic_write_bytes(self.out / CONFIG, lambda f: f.write(json.dumps(config, indent=2).encode()))
        except OSError as e:
            raise UsageError(f"cannot write the run folder: {describe_os_error(e, self.out)}") from None

    # -- training -----------------------------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch)  # as one process: same batches
        tally = Tally()
        self.link.reset()
        start, cpu_start = time.perf_counter(), time.process_time()
        pipelined = self.mode == "pipelined"
        delay = self.delay(self.plan.stage)
        waiting: list[tuple[Any, torch.Size]] = []  # pipelined: batches run forward, their update still to come
        with ExitStack() as stack:
            stack.enter_context(running_stage(self.estimator, self.plan, self.link, self.stubs, self.carry_tangents,
                                              share_output_tangent=not pipelined))
            stack.enter_context(self._own_updates_only())
            record_scores = stack.enter_context(self._scores())
            if pipelined and self.plan.last:
                stack.enter_context(late_signals_sent(self.estimator, self.link))
            elif self.cfg.method in OUTPUT_ERROR_RULES and not pipelined:
                stack.enter_context(shared_output_error(self.estimator, self.link))
            if self.replicas > 1 and cfg.method in SIGNAL_RULES:  # what it combines inside a step: over the replicas
                self.estimator.group = ReplicaGroup(self.copies)  # type: ignore[assignment]
                stack.callback(setattr, self.estimator, "group", LOCAL)
            for step, (x, y) in enumerate(islice(self.data.train_batches(cfg.batch_size, generator,
                                                                         **self.copies.shard_args),
                                                 self.steps_per_epoch)):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if delay:
                    kept, result = self._forward_only(x)
                    waiting.append((kept, x.shape))
                    if len(waiting) > delay:
                        self._late_update(*waiting.pop(0))
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    rows = self.copies.rows(min(cfg.batch_size, self.data.num_train - step * cfg.batch_size))
                    self.estimator.shard = rows
                    result = self.estimator.step(x, y)
                    if self.plan.last and not torch.isfinite(result.loss):
                        error = self.diverged(f"loss became {result.loss.item()}", step)
                        if not self.group.is_main:  # the stage that saw it says so (the others lose a peer)
                            record_failure(self.out, asdict(cfg), "diverged", f"diverged at epoch {self.epoch + 1}",
                                           str(error))
                        raise error
                    if rows is not None:  # the whole batch's update on every replica of the stage
                        zero_missing_grads(self.owned_params)
                        self.copies.average_([p.grad for p in self.owned_params], rows.weight)
                        self.copies.average_(self.owned_buffers, rows.weight)
                    self.optimizer.step()
                    self.schedule.step()
                self._count(tally, result, y, record_scores())
            while waiting:  # the pipeline drains at the epoch's end: checkpoints hold no batch in flight
                self._late_update(*waiting.pop(0))
            self.link.flush()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        mine = {"tally": {"loss": tally.loss, "wrong": tally.wrong, "seen": tally.seen, "extras": tally.extras},
                "wall": wall, "cpu": cpu, "idle": self.link.idle, "sent": self.link.sent, "steps": self.steps_per_epoch,
                "peak": self.peak_mb}
        record = self._combine(mine, tally)
        self._share_state()
        return record

    def _forward_only(self, x: torch.Tensor) -> tuple[Any, StepResult]:
        """Pipelined, a stage before the last: the rule's forward pass of this batch (sending the boundary, with
        its tangents for fg-a), keeping what the stage's own update will need when the batch's signal comes."""
        est = self.estimator
        if isinstance(est, ForwardGradientActivity):
            est._new_step()  # the tangents' stream, seeded as on every stage
            est._check_batch_norm()
            mods, loose = est._perturbed_maps()
            mine = {id(p) for p in self.owned_params}
            records: list[Any] = []
            logits, _, _ = est._activity_pass(
                x, mods, loose, est._readout_module(),
                lambda rec: records.append(rec) if any(id(p) in mine for p in rec.params) else None, dual=True)
            named = dict(self.model.named_parameters())
            kept: Any = (records, {n: v for n, v in loose.items() if id(named[n]) in mine})
        elif isinstance(est, ForwardGradientWeight):
            # The rule's own step (its pass sends the boundary with its tangent); the gradients it forms from this
            # stage's stand-in output are replaced when the batch's d comes. Kept: the weight tangents it drew.
            drawn: list[torch.Tensor] = []
            sample = est._sample_

            def keep(out: torch.Tensor, copies: int = 0) -> torch.Tensor:
                drawn.append(sample(out, copies))
                return drawn[-1]

            est._sample_ = keep  # type: ignore[method-assign]
            try:
                logits = est.step(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device)).logits
            finally:
                del est._sample_
            readout = est._readout_module()
            skip = {id(p) for p in readout.parameters()} if readout is not None else set()
            perturbed = [p for p in self.model.parameters() if p.requires_grad and id(p) not in skip]  # draw order
            mine = {id(p) for p in self.owned_params}
            orthogonal = est.aggregation == "orthogonal"
            kept = ([(p, v) for p, v in zip(perturbed, drawn, strict=True) if id(p) in mine],
                    T.gram(drawn, entries=T.entries(est.dist)) if orthogonal else None,
                    sum(v[0].numel() for v in drawn))
        else:
            assert isinstance(est, _DirectFeedback)
            # The optimizer changes the weights in place before this batch's update: the update is formed at the
            # weights its forward used (autograd keeps copies of the stage's weights it saves for the backward).
            storages = {p.untyped_storage().data_ptr() for p in self.owned_params}

            def stash(t: torch.Tensor) -> torch.Tensor:
                return t.clone() if t.untyped_storage().data_ptr() in storages else t

            with torch.autograd.graph.saved_tensors_hooks(stash, lambda t: t):
                outs, tangents, logits, _ = est._forward_generic(x)
            if est.feedback is None:
                est.feedback = est.init_feedback(outs, logits.shape[1])
            # fdfa learns every B_l (so that every stage holds the one B a checkpoint saves) from this batch's u_l,
            # drawn into buffers the next step reuses: kept as copies until its ẏ comes
            us = [u.clone() for u in tangents] if est.use_tangents else []
            kept = ([(i, o) for i, o in enumerate(outs) if o.requires_grad], logits.shape[1], logits.dtype, us)
        return kept, StepResult(torch.zeros(()), logits.detach())

    def _late_update(self, kept: Any, shape: torch.Size) -> None:
        """Pipelined: the oldest waiting batch's update, from the signal the last stage sent for it."""
        est, rows = self.estimator, shape[0]
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(est, ForwardGradientActivity):
            records, loose = kept
            d = self.link.recv_late((est.K, rows), torch.float32, self.device)
            c = T.coefficients(d, est.aggregation, None, 1)
            for rec in records:
                est._map_grads(rec, c)
            named = dict(self.model.named_parameters())
            for n, v in loose.items():
                named[n].grad = c.sum().to(v.dtype) * v
        elif isinstance(est, ForwardGradientWeight):
            tangents, gram, dim = kept
            d = self.link.recv_late((est.K,), torch.float32, self.device)
            c = T.coefficients(d, est.aggregation, gram, dim)
            for p, v in tangents:
                p.grad = torch.tensordot(c.to(v.dtype), v, dims=1)
        else:
            assert isinstance(est, _DirectFeedback) and est.feedback is not None
            outs, classes, dtype, us = kept
            if est.use_tangents:  # fdfa: e and ẏ side by side; B learns before or after its use, as in one process
                signal = self.link.recv_late((rows, 2 * classes), dtype, self.device)
                e, y_dot = signal[:, :classes], signal[:, classes:]
            else:
                e = self.link.recv_late((rows, classes), dtype, self.device)
            if us and est.feedback_timing == "after":
                est.learn_feedback(y_dot, us)
            for i, out in reversed(outs):  # last block first, as the rule's own step
                torch.autograd.backward(out, (e @ est.feedback[i]).view_as(out))
            if us and est.feedback_timing == "before":
                est.learn_feedback(y_dot, us)
        zero_missing_grads(est.trainable())
        self.optimizer.step()
        self.schedule.step()

    @contextmanager
    def _scores(self) -> Iterator[Callable[[], torch.Tensor | None]]:
        """sff predicts from the goodness of every unit: each stage keeps its own units' share per step (the rule's
        `goodness` watched while the stage runs); other rules predict from the last stage's logits."""
        est = self.estimator
        if not isinstance(est, ScalableFF):
            yield lambda: None
            return
        original, units = est.goodness, len(self.unit_stage)
        only_last = est.options["inference"] == "last"
        share: list[torch.Tensor] = []

        def goodness(k: int, out: torch.Tensor) -> torch.Tensor:
            g = original(k, out)
            if self.unit_stage[k] == self.plan.stage and (not only_last or k == units - 1):
                share.append(g.detach())
            return g

        def take() -> torch.Tensor | None:
            got = torch.stack(share).sum(0) if share else None
            share.clear()
            return got

        est.goodness = goodness
        try:
            yield take
        finally:
            del est.goodness

    def _count(self, tally: Tally, result: StepResult, y: torch.Tensor, scores: torch.Tensor | None) -> None:
        n = len(y)
        tally.seen += n
        tally.loss += float(result.loss) * n
        if self.plan.last:
            tally.wrong += int((result.logits.argmax(1) != y).sum())
        for k, v in (result.extra or {}).items():
            if self._owns_metric(k):
                tally.extras[k] = tally.extras.get(k, 0.0) + float(v) * n
        if isinstance(self.estimator, ScalableFF):
            tally.scores.append(torch.zeros(n, self.estimator.num_classes) if scores is None
                                else scores.float().cpu())
            tally.labels.append(y.cpu())

    def _owns_metric(self, key: str) -> bool:
        """A per-unit metric (`local_loss_3`, `loss_unit5`) belongs to its unit's stage, the others to the last."""
        match = INDEXED.search(key)
        if match and int(match.group(1)) < len(self.unit_stage):
            return self.unit_stage[int(match.group(1))] == self.plan.stage
        return self.plan.last

    def _combine(self, mine: dict[str, Any], tally: Tally) -> dict[str, float]:
        """The epoch's metrics of the whole run from every stage's tally, and each stage's busy / idle seconds."""
        everyone = self.copies.per_stage(
            [json.loads(b) for b in self.group.all_gather_bytes(json.dumps(mine).encode())])
        last = everyone[-1]["tally"]
        seen = last["seen"]
        extras: dict[str, float] = {}
        for stage in everyone:
            extras.update({k: v / seen for k, v in stage["tally"]["extras"].items()})
        loss, wrong = last["loss"] / seen, last["wrong"]
        if isinstance(self.estimator, ScalableFF):
            # sff's loss is the mean of its units' losses; its prediction combines every unit's goodness
            unit_losses = [v for k, v in extras.items() if k.startswith("loss_unit")]
            loss = sum(unit_losses) / len(unit_losses)
            buf = io.BytesIO()
            torch.save(torch.cat(tally.scores), buf)
            shares = [torch.load(io.BytesIO(b), weights_only=True) for b in self.group.all_gather_bytes(buf.getvalue())]
            mine = shares[self.copies.replica::self.replicas]  # every stage's share of this replica's rows
            wrong = self.copies.total(int((torch.stack(mine).sum(0).argmax(1) != torch.cat(tally.labels)).sum()))
        record = {"train_loss": loss, "train_error": 100.0 * wrong / seen, **dict(sorted(extras.items()))}
        for s, stage in enumerate(everyone):
            record[f"stage{s}_busy_seconds"] = stage["wall"] - stage["idle"]
            record[f"stage{s}_idle_seconds"] = stage["idle"]
            # busy is wall time not spent waiting: on a shared machine it includes time the process was ready but
            # not running; its CPU seconds (all its threads) tell the two apart
            record[f"stage{s}_cpu_seconds"] = stage["cpu"]
            record[f"stage{s}_images_per_second"] = stage["tally"]["seen"] / stage["wall"]
            record[f"stage{s}_sent_bytes_per_step"] = stage["sent"] / max(1, stage["steps"])
            record[f"stage{s}_peak_memory_mb"] = stage["peak"]
        self.step_peak_mb = max(stage["peak"] for stage in everyone)
        return record

    def _share_state(self) -> None:
        """Every stage sends the state it owns to every other, so each holds the whole trained model (evaluation,
        the checkpoint); rank 0 also gathers every stage's optimizer and schedule for the checkpoint."""
        tensors = stage_tensors(self.estimator)
        mine = {k: v.detach() for k, v in tensors.items() if self.owners.get(k) == self.plan.stage}
        buf = io.BytesIO()
        torch.save(mine, buf)
        blobs = self.group.all_gather_bytes(buf.getvalue())
        with torch.no_grad():
            for s, blob in enumerate(blobs[::self.replicas]):  # the replicas of a stage hold the same state
                if s != self.plan.stage:
                    for k, v in torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True).items():
                        tensors[k].copy_(v)
        buf = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}, buf)
        self._stage_states = self.group.all_gather_bytes(buf.getvalue())

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Rank 0: the whole model (as a one-process checkpoint has it) plus every stage's optimizer, schedule and
        random streams, in one file written atomically: all stages are saved at the same step."""
        assert self._stage_states is not None
        stages = [torch.load(io.BytesIO(b), weights_only=True) for b in self._stage_states[::self.replicas]]
        state = {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": stages[0]["optimizer"],
            "schedule": stages[0]["schedule"],
            "estimator": self.estimator.state_dict(),
            "rng": global_rng_state(),
            "records": self.records,
            "config": self.stored_config(),
            "rank_states": self._rank_states,
            "stages": {"starts": self.starts, "optimizers": [s["optimizer"] for s in stages],
                       "schedules": [s["schedule"] for s in stages]},
        }
        atomic_write_bytes(self.out / CHECKPOINT, lambda f: torch.save(state, f))

    def load_checkpoint(self, raw: bytes) -> None:
        state = self.parse_checkpoint(raw)
        self.folder.forget_parsed()
        s = self.plan.stage
        try:
            staged, own = state["stages"], state["rank_states"][self.group.rank]
            self.model.load_state_dict(state["model"])
            self.estimator.load_state_dict(state["estimator"])
            self.optimizer.load_state_dict(staged["optimizers"][s])
            self.schedule.load_state_dict(staged["schedules"][s])
            set_global_rng_state(own["rng"])
            self.estimator.generator.set_state(own["generator"])
        except Exception as e:  # another model, method or number of stages: torch raises several kinds
            raise UsageError(f"cannot resume from {self.out / CHECKPOINT}: it does not fit this staged run "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        self.epoch = state["epoch"]
        self.records = list(state["records"])


def train(cfg: TrainConfig, show_progress: bool | None = None, log_epochs: bool = False,
          replicas: int = 1) -> list[dict[str, Any]]:
    """Train (or resume) one staged run in this process (one stage of a torchrun group of `cfg.stages` x
    `replicas` ranks)."""
    if not distributed.launched_by_torchrun():
        raise UsageError("--stages: each stage is a process; launch with `bpfree train --stages S`")
    from bpfree.training import lrfind

    group = lrfind.resolve_joined(cfg, None, show_progress)  # --lr auto: stage 0 probes the rule in one process
    if cfg.method in PIPELINE_RULES:
        from bpfree.training.pipeline_bp import PipelinedBackpropRun as run_class
    else:
        run_class = StagedRun
    run = run_class(cfg, replicas=replicas,
                    show_progress=False if show_progress is None else show_progress, log_epochs=log_epochs)
    records = run.train()
    distributed.shutdown(run.group)
    distributed.shutdown(group)
    return records
