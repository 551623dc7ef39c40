"""bp and fa on `--stages S` through PyTorch's own pipeline engine (`torch.distributed.pipelining`): a manual
`PipelineStage` per process and the `ScheduleGPipe` / `Schedule1F1B` schedules, with `--microbatches M`.

The stage module is the local rules' view of the model (training/stages.py): the whole model runs its own forward
(for fa, inside its feedback layers) with the blocks outside the stage stubbed, the received activation put in at
the boundary before the stage, and the forward stopped at the stage's last block, whose output is what the engine
sends on. The engine runs each micro-batch's backward through it and sends the gradient of the received activation
back. So the split, the composition check, parameter ownership, metrics, the epoch-end exchange, the checkpoint,
`--resume` and the exit codes are the local rules' (`StagedRun`); only the step differs.

A boundary travels in its own memory order (a ViT's tokens are a transposed view, which gloo refuses to send, and
kernels round differently on another layout): the sender permutes it to the order a probe pass found, the receiver
permutes it back, so the next stage computes on the layout one process would.

With `--nproc R` (stage_replicas.py) each replica runs its own pipeline over its rows, on the process group of its
copies of the S stages, and the replicas of a stage average the gradients they own after each step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from bpfree import methods
from bpfree.core.anatomy import eval_mode, example_input, forwards_replaced
from bpfree.core.errors import UsageError
from bpfree.core.memory import measured
from bpfree.methods.base import zero_missing_grads
from bpfree.methods.bp import Backprop
from bpfree.methods.feedback_alignment import FeedbackAlignment, feedback_layers
from bpfree.training.checkpoint import record_failure
from bpfree.training.stage_links import memory_order
from bpfree.training.stage_plan import StagePlan, restored, stage_tensors
from bpfree.training.stages import StagedRun, Tally, check_stages, parse_split
from bpfree.training.train import TrainConfig, lr_multipliers_by_id, make_optimizer, make_schedule

DEFAULT_MICROBATCHES = 4
DEFAULT_SCHEDULE = "1f1b"
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
# What gloo and NCCL say when a peer is gone or silent (the engine re-raises them inside its own RuntimeError).
TRANSPORT_ERRORS = ("gloo", "Connection closed", "Connection reset", "Timed out", "timed out", "NCCL")


def micro_batches(rows: int, wanted: int) -> int:
    """The micro-batches a batch of `rows` runs as: `wanted`, or the largest count below it that divides the batch
    (the engine's receive buffers have one shape for all of a step's micro-batches)."""
    return max(m for m in range(1, min(wanted, rows) + 1) if rows % m == 0)


def profile_backprop(estimator: Backprop, x: torch.Tensor, y: torch.Tensor, repeats: int = 2) -> list[float]:
    """Seconds of one step spent in each block, forward and backward (block i's backward: from the gradient of its
    output to that of the block before; the last block also holds the readout and the loss), the mean of `repeats`
    steps after a warm-up; changes nothing (`restored`)."""
    blocks = estimator.anatomy.blocks
    n = len(blocks)
    forward: dict[int, float] = {}
    backward: dict[int, float] = {}

    def exit_hook(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda _g: backward.__setitem__(i, time.perf_counter()) and None)
        return hook

    handles = [b.modules[0].register_forward_pre_hook(lambda *_a, i=i: forward.__setitem__(i, time.perf_counter()))
               for i, b in enumerate(blocks)]
    handles += [b.exit.register_forward_hook(exit_hook(i)) for i, b in enumerate(blocks)]
    handles.append(estimator.model.register_forward_hook(lambda *_a: forward.__setitem__(n, time.perf_counter())))
    seconds = [0.0] * n
    try:
        with restored(estimator):
            for r in range(repeats + 1):
                forward.clear()
                backward.clear()
                start = time.perf_counter()
                estimator.step(x, y)
                end = time.perf_counter()
                if r == 0:
                    continue  # warm-up
                f = [start, *(forward.get(i, start) for i in range(1, n)), forward.get(n, end)]
                b = [backward.get(i, end) for i in range(n)]
                for i in range(n):
                    after = b[i - 1] if i > 0 else end  # the gradient of the block before this one is ready
                    ready = b[i] if i < n - 1 else f[n]  # the last block's backward starts with the loss's
                    seconds[i] += (f[i + 1] - f[i] + after - ready) / repeats
    finally:
        for h in handles:
            h.remove()
    return seconds


class _Stop(Exception):
    """Raised at the stage's last block to end the model's forward there, carrying that block's output."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out


class StageModule(nn.Module):
    """One stage of the model as the module the pipeline engine runs: input the batch (stage 0) or the previous
    stage's boundary in its sending order; output the stage's boundary in its sending order (the logits on the last
    stage)."""

    def __init__(self, estimator: Backprop, plan: StagePlan, stubs: list[tuple[nn.Module, Callable[..., Any]]],
                 orders: list[list[int]]):
        super().__init__()
        self.model = estimator.model  # registered: the engine reads the stage's parameters from it
        self.estimator, self.plan, self.stubs, self.orders = estimator, plan, stubs, orders

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        plan, blocks = self.plan, self.estimator.anatomy.blocks
        handles = []
        if plan.stage == 0:
            x = h
        else:
            order = self.orders[plan.stage - 1]
            received = h.permute([order.index(d) for d in range(h.dim())])
            # the code before the first block runs on zeros: its outputs reach only stubs
            x = torch.zeros((h.shape[0], *self.estimator.anatomy.input_shape), dtype=h.dtype, device=h.device)
            handles.append(blocks[plan.start - 1].exit.register_forward_hook(lambda *_a: received))
        if not plan.last:
            def stop(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
                raise _Stop(out)
            handles.append(blocks[plan.stop - 1].exit.register_forward_hook(stop))
        try:
            with ExitStack() as stack:
                if isinstance(self.estimator, FeedbackAlignment):  # entered first: the stubs replace its layers
                    est = self.estimator
                    stack.enter_context(feedback_layers(est.model, est.weights, est.feedback))
                stack.enter_context(forwards_replaced(self.stubs))
                return self.model(x)
        except _Stop as done:
            return done.out.permute(self.orders[plan.stage]).contiguous()
        finally:
            for handle in handles:
                handle.remove()


class PipelinedBackpropRun(StagedRun):
    """A `StagedRun` for bp and fa: each step is one run of the pipeline schedule over the batch's micro-batches
    (`cfg.microbatches`, `cfg.pipeline_schedule`), then each stage's optimizer steps its own parameters."""

    def __init__(self, cfg: TrainConfig, **kwargs: Any):
        # Resolved before the run folder is opened: config.json records them, and a resume resolves them alike.
        check_stages(cfg.method, cfg.stages, 1, parse_split(cfg.stage_split), cfg.stage_mode, cfg.method_options,
                     cfg.microbatches, cfg.pipeline_schedule)
        cfg.microbatches = cfg.microbatches or DEFAULT_MICROBATCHES
        # 1F1B with fewer micro-batches than stages is GPipe (torch's 1F1B refuses it)
        cfg.pipeline_schedule = cfg.pipeline_schedule or (DEFAULT_SCHEDULE if cfg.microbatches >= cfg.stages
                                                          else "gpipe")
        self.pipelines: dict[tuple[int, int], tuple[PipelineStage, Any]] = {}
        self.busy_seconds = [0.0]  # the stage's compute this epoch (the engine's forward and backward calls)
        super().__init__(cfg, **kwargs)

    def _build(self, data: Any) -> None:
        self._build_whole(data)
        cfg, est = self.cfg, self.estimator
        if not isinstance(est, Backprop) or est.contrastive or methods.find_fast_path(cfg.method, self.model):
            raise UsageError(f"--stages: {cfg.method} on {type(self.model).__name__} runs a model-specific fast path "
                             "without block hooks; it cannot be staged")
        self._place()
        self.owned_params = [p for p, s in zip(self.model.parameters(), self.param_owner)
                             if s == self.plan.stage and p.requires_grad]
        self.unit_stage = [self.plan.stage_of(b) for b in range(len(est.anatomy.blocks))]
        self.optimizer = make_optimizer(cfg, self.owned_params, lr_multipliers_by_id(est))
        self.schedule = make_schedule(cfg, self.optimizer, self.steps_per_epoch)
        self.owned_buffers = [b for k, b in stage_tensors(est).items() if self.owners.get(k) == self.plan.stage
                              and b.is_floating_point() and not isinstance(b, nn.Parameter)]
        self.boundaries = self._boundaries()
        self.module = StageModule(est, self.plan, self.stubs, [order for order, _ in self.boundaries])
        self.peak_mb = self._stage_peak()

    def _profile(self) -> list[float]:
        """Each block's forward and backward seconds, measured by rank 0 on the first batch, sent to every stage."""
        seconds: list[float] = []
        if self.group.is_main:
            x, y = next(iter(self.data.train_batches(self.cfg.batch_size, torch.Generator().manual_seed(0))))
            seconds = profile_backprop(self.estimator, x.to(self.device), y.to(self.device))
        return json.loads(self.group.broadcast_bytes(json.dumps(seconds).encode()).decode())

    def _boundaries(self) -> list[tuple[list[int], tuple[tuple[int, ...], torch.dtype]]]:
        """For each stage but the last, the memory order and per-example shape of its last block's output (one
        probe pass, the same on every stage)."""
        blocks, found = self.estimator.anatomy.blocks, {}
        exits = [blocks[self.starts[s + 1] - 1].exit for s in range(self.stages - 1)]

        def record(s: int) -> Callable[..., None]:
            def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
                found.setdefault(s, (memory_order(out), (tuple(out.shape[1:]), out.dtype)))
            return hook

        handles = [m.register_forward_hook(record(s)) for s, m in enumerate(exits)]
        try:
            with eval_mode(self.model), torch.no_grad():
                self.model(example_input(self.model, self.estimator.anatomy.input_shape))
        finally:
            for h in handles:
                h.remove()
        return [found[s] for s in range(self.stages - 1)]

    def _io(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example input and output of this stage for a micro-batch of `rows` (the engine's static shapes)."""
        s = self.plan.stage

        def boundary(k: int) -> torch.Tensor:
            order, (dims, dtype) = self.boundaries[k]
            shape = (rows, *dims)
            return torch.empty([shape[d] for d in order], dtype=dtype, device=self.device)

        first = self.data.input_shape if s == 0 else None
        inp = torch.empty((rows, *first), device=self.device) if first else boundary(s - 1)
        out = torch.empty((rows, self.data.num_classes), device=self.device) if self.plan.last else boundary(s)
        # the engine sends a gradient back for an input that requires one
        return inp.requires_grad_(s > 0), out.requires_grad_()

    def _pipeline(self, rows: int) -> Any:
        """The engine's schedule for a batch of `rows` (one stage and schedule per micro-batch count and size)."""
        m = micro_batches(rows, self.cfg.microbatches or 1)
        key = (m, rows // m)
        if key not in self.pipelines:
            inp, out = self._io(rows // m)
            stage = PipelineStage(self.module, self.plan.stage, self.stages, self.device, input_args=inp,
                                  output_args=out, group=self.copies.pipe)  # this replica's pipeline
            busy = self.busy_seconds
            for name in ("forward_one_chunk", "backward_one_chunk"):
                setattr(stage, name, _timed(getattr(stage, name), busy))
            loss_fn = self.estimator.loss_fn
            # A batch that runs as fewer micro-batches than stages (the last, say) runs GPipe: 1F1B needs M >= S.
            # Each micro-batch's mean loss is weighted by its share of the batch: the gradients sum to the batch's.
            kind = self.cfg.pipeline_schedule if m >= self.stages else "gpipe"
            schedule = SCHEDULES[kind or DEFAULT_SCHEDULE](
                stage, m, loss_fn=lambda logits, y: loss_fn(logits, y) * (1.0 / m), scale_grads=False)
            self.pipelines[key] = (stage, schedule)
        return self.pipelines[key][1]

    def _stage_peak(self) -> float:
        """This stage's activation peak (MiB) over one batch as the schedule holds it: the micro-batches it keeps
        in flight (GPipe: all M; 1F1B: at most S - stage) run forward, then backward; measured alone before
        training (zeros in, nothing sent)."""
        m = micro_batches(self.cfg.batch_size, self.cfg.microbatches or 1)
        rows = self.cfg.batch_size // m
        gpipe = self.cfg.pipeline_schedule == "gpipe" or m < self.stages
        flight = m if gpipe else min(m, self.stages - self.plan.stage)
        inp, _ = self._io(rows)
        inp = torch.zeros_like(inp).requires_grad_(inp.requires_grad)

        def step() -> None:
            outs = [self.module(inp) for _ in range(flight)]
            for o in outs:
                if self.plan.last:
                    self.estimator.loss_fn(o, torch.zeros(rows, dtype=torch.long, device=self.device)).backward()
                else:
                    o.backward(torch.zeros_like(o))

        with restored(self.estimator):
            return measured(step, self.device)[1] / 2**20

    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.epoch)  # as one process: same batches
        tally = Tally()
        busy = self.busy_seconds
        busy[0] = 0.0
        sent = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        for step, (x, y) in enumerate(islice(self.data.train_batches(cfg.batch_size, generator,
                                                                     **self.copies.shard_args),
                                             self.steps_per_epoch)):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            schedule = self._pipeline(len(y))
            self.optimizer.zero_grad(set_to_none=True)
            losses: list[torch.Tensor] = []
            if self.plan.stage == 0:
                self._engine_step(schedule, x)
            elif self.plan.last:
                logits = self._engine_step(schedule, target=y, losses=losses)
            else:
                self._engine_step(schedule)
            sent += self._sent_bytes(len(y))
            if self.plan.last:
                loss = torch.stack([v.detach() for v in losses]).sum()
                if not torch.isfinite(loss):
                    error = self.diverged(f"loss became {loss.item()}", step)
                    if not self.group.is_main:  # the stage that saw it says so (the others lose a peer)
                        record_failure(self.out, asdict(self.cfg), "diverged",
                                       f"diverged at epoch {self.epoch + 1}", str(error))
                    raise error
                tally.loss += float(loss) * len(y)
                tally.wrong += int((logits.argmax(1) != y).sum())
            tally.seen += len(y)
            zero_missing_grads(self.owned_params)
            rows = self.copies.rows(min(cfg.batch_size, self.data.num_train - step * cfg.batch_size))
            if rows is not None:  # each replica's pipeline ran its rows: the whole batch's update on every replica
                self.copies.average_([p.grad for p in self.owned_params], rows.weight)
                self.copies.average_(self.owned_buffers, rows.weight)
            self.optimizer.step()
            self.schedule.step()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        mine = {"tally": {"loss": tally.loss, "wrong": tally.wrong, "seen": tally.seen, "extras": tally.extras},
                "wall": wall, "cpu": cpu, "idle": max(0.0, wall - busy[0]), "sent": sent,
                "steps": self.steps_per_epoch, "peak": self.peak_mb}
        record = self._combine(mine, tally)
        self._share_state()
        return record

    def _engine_step(self, schedule: Any, *args: Any, **kwargs: Any) -> Any:
        """One run of the schedule; a peer lost or silent past --dist-timeout stops this stage (exit 4), any other
        error is raised as it is."""
        try:
            return schedule.step(*args, **kwargs)
        except (RuntimeError, dist.DistError) as e:
            if not lost_peer(e):
                raise
            return self.group.guarded("pipeline step", _reraise, e)

    def _sent_bytes(self, rows: int) -> int:
        """Bytes this stage sends per step: its boundary forward, the gradient of the one it received back."""
        total = 0
        for k in ([self.plan.stage] if not self.plan.last else []) + ([self.plan.stage - 1] if self.plan.stage else []):
            _, (dims, dtype) = self.boundaries[k]
            total += rows * int(torch.Size(dims).numel()) * torch.empty((), dtype=dtype).element_size()
        return total


def lost_peer(error: BaseException) -> bool:
    """Whether an error of the engine (which wraps what it calls) comes from the transport: a peer died or timed
    out."""
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        if isinstance(seen, dist.DistError) or any(k in text for k in TRANSPORT_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _reraise(error: BaseException) -> None:
    raise error


def _timed(fn: Callable[..., Any], busy: list[float]) -> Callable[..., Any]:
    """`fn` adding its seconds to busy[0] (the stage's compute; the rest of a step is waiting or the engine's)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            busy[0] += time.perf_counter() - start
    return wrapper
