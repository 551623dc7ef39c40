"""Which blocks each stage of `--stages S` runs and owns (training/stages.py runs them).

The split is balanced from a short profile of each block's step time, or named with `--stage-split`. A stage runs the
whole model's forward with the blocks outside it stubbed (zeros of the shape a probe pass recorded), and steps the
parameters and estimator state its blocks' outputs depend on (`ownership`, `state_owners`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
from torch import nn

from bpfree.core.anatomy import Anatomy, eval_mode, example_input
from bpfree.core.errors import UsageError
from bpfree.methods.base import Estimator
from bpfree.methods.block_local import BlockLocalFGActivity
from bpfree.methods.forward_forward import ScalableFF
from bpfree.methods.forward_gradient import ForwardGradientActivity
from bpfree.training.checkpoint import rng_state as global_rng_state
from bpfree.training.checkpoint import set_rng_state as set_global_rng_state
from bpfree.training.stage_links import ProbeLink, running_stage

# -- choosing the stages ------------------------------------------------------------------------------------------


# -- choosing the stages ------------------------------------------------------------------------------------------


def balanced_starts(costs: Sequence[float], stages: int) -> list[int]:
    """The first block of each stage: contiguous stages, each of one block or more, minimising the largest stage's
    cost (exact, by dynamic programming over the blocks)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise UsageError(f"--stages {stages}: the model has {n} blocks (a stage needs one or more)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][j]: the smallest largest-stage cost of k stages over the first j blocks; cut[k][j]: where the last began
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    starts, j = [], n
    for k in range(stages, 0, -1):
        j = cut[k][j]
        starts.append(j)
    return starts[::-1]


def named_starts(anatomy: Anatomy, names: Sequence[str], stages: int) -> list[int]:
    """--stage-split: the block names that begin stages 2..S, as block indices."""
    order = [b.name for b in anatomy.blocks]
    starts = [0]
    for name in names:
        if name not in order:
            raise UsageError(f"--stage-split: {name!r} is not a block (blocks: {', '.join(order)})")
        starts.append(order.index(name))
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise UsageError(f"--stage-split {','.join(names)}: name blocks after the first, in the order they run")
    if len(starts) != stages:
        raise UsageError(f"--stage-split names {len(names)} blocks; --stages {stages} needs {stages - 1}")
    return starts


@contextmanager
def restored(estimator: Estimator) -> Iterator[None]:
    """Steps taken inside change nothing training sees: the model's state (batch-norm statistics), the estimator's
    (its random streams) and the global RNG are put back, and the gradients cleared."""
    model = estimator.model
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(estimator.state_dict()), global_rng_state())
    try:
        yield
    finally:
        model.load_state_dict(saved[0])
        estimator.load_state_dict(saved[1])
        set_global_rng_state(saved[2])
        for p in estimator.trainable():
            p.grad = None


def profile_blocks(estimator: Estimator, x: torch.Tensor, y: torch.Tensor, repeats: int = 2) -> list[float]:
    """Seconds of one step spent in each block (its forward and its local update; the last block also the
    readout), the mean of `repeats` steps after one warm-up; changes nothing (`restored`)."""
    blocks = estimator.anatomy.blocks
    marks: list[tuple[int, float]] = []
    handles = [b.modules[0].register_forward_pre_hook(lambda *_a, i=i: marks.append((i, time.perf_counter())))
               for i, b in enumerate(blocks)]
    seconds = [0.0] * len(blocks)
    try:
        with restored(estimator):
            for r in range(repeats + 1):
                marks.clear()
                start = time.perf_counter()
                estimator.step(x, y)
                end = time.perf_counter()
                if r == 0:
                    continue  # warm-up
                times = [(0, start), *marks, (marks[-1][0] if marks else 0, end)]
                for (i, t0), (_, t1) in zip(times, times[1:]):
                    seconds[i] += (t1 - t0) / repeats
    finally:
        for h in handles:
            h.remove()
    return seconds


# -- one stage's view of the model --------------------------------------------------------------------------------


# -- one stage's view of the model ------------------------------------------------------------------------------


@dataclass
class StagePlan:
    """Stage `stage` of `len(starts)` runs blocks [start, stop)."""

    starts: list[int]
    blocks: int
    stage: int

    @property
    def start(self) -> int:
        return self.starts[self.stage]

    @property
    def stop(self) -> int:
        return self.starts[self.stage + 1] if self.stage + 1 < len(self.starts) else self.blocks

    @property
    def last(self) -> bool:
        return self.stage == len(self.starts) - 1

    def owns(self, block: int) -> bool:
        return self.start <= block < self.stop

    def stage_of(self, block: int) -> int:
        return max(s for s, a in enumerate(self.starts) if a <= block)


Shape = tuple[tuple[int, ...], torch.dtype]


def _first_tensor(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor:
    for a in [*args, *kwargs.values()]:
        if isinstance(a, torch.Tensor):
            return a
    raise UsageError("--stages: a block module was called without a tensor input")


def _zeros(shape: Shape, like: torch.Tensor) -> torch.Tensor:
    dims, dtype = shape
    return torch.zeros((like.shape[0], *dims), dtype=dtype, device=like.device)


def make_stub(module: nn.Module, output: Any, between: list[Shape], draws: list[Shape],
              sample: Callable[[tuple[int, ...], torch.Tensor], Any] | None, anchored: bool) -> Callable[..., Any]:
    """`module`'s forward replaced by zeros of its probed output (`output`: a Shape, or a tuple of Shapes / None),
    as many rows as its input. A `between=` callback (sff's split units) is called with zeros of each shape it
    saw, so the rule's unit count stays as in the whole model; `draws`: the noise lg-fg-a would have drawn inside
    the module (drawn and dropped, so later blocks get their own). `anchored`: where gradients are on, the zeros
    hang off one element of the module's first parameter, so a rule differentiating them (lg-fg-a's modules'
    vector-Jacobian products) gets zeros, not an error; the others skip what does not require grad, and anchoring
    would cost them a backward through every stub."""
    params = [p for p in module.parameters() if p.requires_grad] if anchored else []

    def zeros(shape: Shape, like: torch.Tensor) -> torch.Tensor:
        z = _zeros(shape, like)
        if params and torch.is_grad_enabled():
            z = z + params[0].reshape(-1)[:1].to(z.dtype) * 0
        return z

    def stub(*args: Any, **kwargs: Any) -> Any:
        like = fwad.unpack_dual(_first_tensor(args, kwargs)).primal
        for dims, dtype in draws:
            assert sample is not None
            sample((like.shape[0], *dims), torch.empty(0, dtype=dtype, device=like.device))
        callback = kwargs.get("between")
        if callback is not None:
            for shape in between:
                callback(zeros(shape, like))
        if isinstance(output, list):
            return tuple(None if s is None else zeros(s, like) for s in output)
        return zeros(output, like)

    return stub


def _shape_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return (tuple(out.shape[1:]), out.dtype)
    if isinstance(out, tuple) and all(o is None or isinstance(o, torch.Tensor) for o in out):
        return [None if o is None else (tuple(o.shape[1:]), o.dtype) for o in out]
    raise UsageError(f"--stages: a block module returns {type(out).__name__}; stages need tensors")


def probe_stubs(estimator: Estimator, plan: StagePlan) -> list[tuple[nn.Module, Callable[..., Any]]]:
    """The stubs of every module of the blocks outside the stage, from one probe pass (eval mode, no gradients)
    recording what each returns (and, for lg-fg-a, the noise drawn inside the blocks before the stage)."""
    anatomy, model = estimator.anatomy, estimator.model
    outside = [m for i, b in enumerate(anatomy.blocks) if not plan.owns(i) for m in b.modules]
    outputs: dict[nn.Module, Any] = {}
    between: dict[nn.Module, list[Shape]] = {}
    draws: dict[nn.Module, list[Shape]] = {m: [] for m in outside}
    def record(m: nn.Module, _args: Any, out: Any) -> None:
        outputs.setdefault(m, _shape_of(out))

    handles = [m.register_forward_hook(record) for m in outside]
    sample = None
    before = [m for i, b in enumerate(anatomy.blocks) if i < plan.start for m in b.modules]
    if isinstance(estimator, BlockLocalFGActivity):
        sample = estimator.sample
        handles += _watch_draws(estimator, before, draws)
    x = example_input(model, anatomy.input_shape)
    try:
        with eval_mode(model), torch.no_grad():
            if isinstance(estimator, ScalableFF) and estimator.split:
                between.update(_between_shapes(estimator, x))
            elif isinstance(estimator, ForwardGradientActivity):
                sample = _watch_activity_draws(estimator, before, draws, x)
            else:
                model(x)
    finally:
        for h in handles:
            h.remove()
    anchored = isinstance(estimator, BlockLocalFGActivity)
    return [(m, make_stub(m, outputs[m], between.get(m, []), draws[m], sample, anchored))
            for m in outside if m in outputs]


def _watch_draws(estimator: BlockLocalFGActivity, modules: list[nn.Module],
                 draws: dict[nn.Module, list[Shape]]) -> list[Any]:
    """Hooks recording, per block module, the output shapes of the perturbed units strictly inside it, in the
    order they run (a unit that is the block module itself still fires its own hook on the stub's zeros)."""
    running: list[nn.Module] = []
    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(lambda m, _a: running.append(m)))
        handles.append(m.register_forward_hook(lambda _m, _a, _o: running.pop() and None))
    inside = {u for m in modules for u in m.modules() if u is not m}
    for u in (u for us in estimator.units for u in us if u not in estimator.silent and u in inside):
        handles.append(u.register_forward_hook(lambda _u, _a, out: draws[running[-1]].append(
            _shape_of(out[0] if isinstance(out, tuple) else out))))
    return handles


def _watch_activity_draws(estimator: ForwardGradientActivity, modules: list[nn.Module],
                          draws: dict[nn.Module, list[Shape]], x: torch.Tensor) -> Callable[..., Any]:
    """fg-a: one activity pass (changing nothing: `restored`) recording, per block module, the tangents drawn for the
    maps strictly inside it (attention projections included), as numbers per row of the module's input; returns the
    stub's way of drawing them (the draws depend only on how many numbers are drawn)."""
    running: list[tuple[nn.Module, int]] = []
    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(
            lambda m, args, kwargs: running.append((m, _first_tensor(args, kwargs).shape[0])) and None,
            with_kwargs=True))
        handles.append(m.register_forward_hook(lambda _m, _a, _o: running.pop() and None))
    original = estimator._sample_

    def watched(out: torch.Tensor, copies: int = 0) -> torch.Tensor:
        if running:
            module, rows = running[-1]
            draws[module].append(((out.numel() // rows,), out.dtype))
        return original(out, copies)

    estimator._sample_ = watched  # type: ignore[method-assign]
    try:
        with restored(estimator):
            estimator._new_step()
            mods, loose = estimator._perturbed_maps()
            estimator._activity_pass(x, mods, loose, estimator._readout_module(), lambda _rec: None, dual=True)
    finally:
        del estimator._sample_
        for h in handles:
            h.remove()
    return lambda shape, like: original(torch.empty(shape, dtype=like.dtype, device=like.device))


def _between_shapes(estimator: ScalableFF, x: torch.Tensor) -> dict[nn.Module, list[Shape]]:
    """sff (layer-wise): the unit outputs each block hands to its `between` callback."""
    current: list[nn.Module] = []
    seen: dict[nn.Module, list[Shape]] = {}
    handles = []
    for block in estimator.model.blocks:
        handles.append(block.register_forward_pre_hook(lambda m, _a: current.append(m)))
        handles.append(block.register_forward_hook(lambda m, _a, _o: current.pop() and None))

    def visit(_k: int, out: torch.Tensor, _params: list) -> None:
        if current:
            seen.setdefault(current[-1], []).append((tuple(out.shape[1:]), out.dtype))

    try:
        estimator._run(x, visit)
    finally:
        for h in handles:
            h.remove()
    return seen


def unit_blocks(estimator: Estimator) -> list[int]:
    """The block of each of the estimator's units (heads and the index of per-unit metrics): the blocks
    themselves, except for layer-wise sff, whose blocks may hold several units."""
    blocks = len(estimator.anatomy.blocks)
    if not (isinstance(estimator, ScalableFF) and estimator.split):
        return list(range(blocks))
    owner: list[int] = []
    entered = [0]  # the block entered last: its between-units run inside it, its output's unit just after it
    handles = [block.register_forward_pre_hook(lambda _m, _a, i=i: entered.__setitem__(0, i))
               for i, block in enumerate(estimator.model.blocks)]
    model = estimator.model
    try:
        with eval_mode(model), torch.no_grad():
            estimator._run(example_input(model, estimator.anatomy.input_shape),
                           lambda _k, _o, _p: owner.append(entered[0]))
    finally:
        for h in handles:
            h.remove()
    return owner


def ownership(estimator: Estimator, starts: list[int]) -> list[int]:
    """The stage that owns (steps) each model parameter, in `model.parameters()` order, from one probe pass per
    stage: the parameters its blocks' outputs (and, for the last stage, the logits) depend on, given the previous
    stage's output. Also checks that the stages compose to the whole model: each stage, given the true output of
    the block before it, must reproduce the whole model's block outputs and logits (a model whose forward carries
    other values across a stage boundary is refused)."""
    anatomy, model = estimator.anatomy, estimator.model
    params = list(model.parameters())
    owner = [-1] * len(params)
    x = example_input(model, anatomy.input_shape)
    exits: list[torch.Tensor] = []
    hooks = [b.exit.register_forward_hook(lambda _m, _a, out: exits.append(out.detach().clone()))
             for b in anatomy.blocks]
    try:
        with eval_mode(model), torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    for s in range(len(starts)):
        plan = StagePlan(starts, len(anatomy.blocks), s)
        stubs = probe_stubs(estimator, plan)  # before the hooks below: its probe pass must not be seen
        seen: list[torch.Tensor] = []
        hooks = [anatomy.blocks[i].exit.register_forward_hook(lambda _m, _a, out, seen=seen: seen.append(out))
                 for i in range(plan.start, plan.stop)]
        link = ProbeLink(exits[plan.start - 1] if plan.start else None)
        try:
            with eval_mode(model), torch.enable_grad(), running_stage(estimator, plan, link, stubs):
                out = model(x)
        finally:
            for h in hooks:
                h.remove()
        got = [*seen, *([out] if plan.last else [])]
        want = [*exits[plan.start:plan.stop], *([logits] if plan.last else [])]
        if any(g.shape != w.shape or not torch.allclose(g.detach(), w, rtol=1e-4, atol=1e-5)
               for g, w in zip(got, want)):
            name = anatomy.blocks[plan.start].name
            raise UsageError(f"--stages: the stage starting at block {name!r} does not reproduce the model from the "
                             "previous block's output alone (its forward carries other values across that "
                             "boundary); choose other boundaries with --stage-split")
        total = sum(g.float().sum() for g in got if g.requires_grad)
        grads = torch.autograd.grad(total, params, allow_unused=True) if torch.is_tensor(total) else [None] * len(
            params)
        for k, g in enumerate(grads):
            if g is None:
                continue
            if owner[k] not in (-1, s):
                names = [n for n, p in model.named_parameters() if p is params[k]]
                raise UsageError(f"--stages: parameter {names[0]!r} is used by stages {owner[k] + 1} and {s + 1}; "
                                 "a parameter must belong to one stage (choose other boundaries with --stage-split)")
            owner[k] = s
    last = len(starts) - 1
    return [last if o == -1 else o for o in owner]  # unused parameters: stepped (with zero gradients) by one stage


def state_owners(estimator: Estimator, starts: list[int], param_owner: list[int]) -> dict[str, int]:
    """The stage owning each entry of the model's state dict ("model.KEY") and of the estimator's heads
    ("heads.KEY"): parameters as `ownership` says, a module's buffers with its parameters (else with the block that
    holds the module, else the last stage), head k with its unit's block."""
    model = estimator.model
    plan = StagePlan(starts, len(estimator.anatomy.blocks), 0)
    by_id = {id(p): s for p, s in zip(model.parameters(), param_owner)}
    in_block = {id(s): plan.stage_of(i) for i, b in enumerate(estimator.anatomy.blocks) for m in b.modules
                for s in m.modules()}
    owners: dict[str, int] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        stage = by_id[id(own[0])] if own else in_block.get(id(module), len(starts) - 1)
        prefix = f"{name}." if name else ""
        for pname, p in module.named_parameters(recurse=False):
            owners[f"model.{prefix}{pname}"] = by_id[id(p)]
        for bname, _ in module.named_buffers(recurse=False):
            owners[f"model.{prefix}{bname}"] = stage
    heads = getattr(estimator, "heads", None)
    if isinstance(heads, nn.ModuleList):
        units = unit_blocks(estimator)
        for key in heads.state_dict():
            owners[f"heads.{key}"] = plan.stage_of(units[int(key.split(".")[0])])
    return owners


def stage_tensors(estimator: Estimator) -> dict[str, torch.Tensor]:
    """The state the stages share at epoch ends, by the names of `state_owners` (references, not copies)."""
    out = {f"model.{k}": v for k, v in estimator.model.state_dict(keep_vars=True).items()}
    heads = getattr(estimator, "heads", None)
    if isinstance(heads, nn.ModuleList):
        out.update({f"heads.{k}": v for k, v in heads.state_dict(keep_vars=True).items()})
    return out
