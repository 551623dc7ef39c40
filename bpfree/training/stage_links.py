"""What travels between the stages of `--stages S`: boundary activations (and their tangents) point to point, and,
for the rules that learn from the output error, the last stage's loss, error and directional derivatives
(training/stages.py runs them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.forward_ad as fwad
import torch.distributed as dist
from torch import nn

from bpfree.core.anatomy import forwards_replaced
from bpfree.core.group import Group
from bpfree.methods.base import Estimator
from bpfree.methods.feedback_alignment import _DirectFeedback
from bpfree.methods.forward_gradient import ForwardGradientActivity, ForwardGradientWeight

if TYPE_CHECKING:  # stage_plan imports this module
    from bpfree.training.stage_plan import StagePlan

MAX_PENDING_SENDS = 2  # activations a stage may have in flight: bounds its memory, lets it run ahead by this much


def memory_order(t: torch.Tensor) -> list[int]:
    """The dimensions of `t` from the outermost in memory to the innermost: `t.permute(order)` is contiguous
    without a copy when `t` is a dense permuted layout (else the plain order, and sending copies)."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    return order if t.permute(order).is_contiguous() else list(range(t.dim()))


class Link:
    """Point-to-point sends to the next stage and receives from the previous one, with the seconds spent waiting
    (idle) and the bytes sent."""

    def __init__(self, group: Group, plan: StagePlan):
        self.group, self.plan = group, plan
        self.peer: Callable[[int], int] = lambda stage: stage  # the rank of a stage's process (replicas: its copy)
        self.pipe: Any = None  # replicas: this replica's pipeline group, where the last stage's signal is broadcast
        self.pending: list[tuple[torch.Tensor, Any]] = []
        self.late: list[tuple[torch.Tensor, Any]] = []
        self.reset()

    def reset(self) -> None:
        self.idle = 0.0
        self.sent = 0

    def send(self, tensor: torch.Tensor) -> None:
        """Sends the tensor in its own memory order (a header of its dimension order first), so the next stage
        gets the strides this stage had: kernels round differently on another layout (a ViT's boundary is a
        transposed view)."""
        order = memory_order(tensor)
        t = tensor.detach().permute(order).contiguous()
        if t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
            t = t.clone()  # the send is asynchronous, and a rule may change its tensor in place (fdfa adds u to it)
        header = torch.tensor(order, dtype=torch.int64, device=t.device)
        for part in (header, t):
            work = self.group.guarded("isend", dist.isend, part, self.peer(self.plan.stage + 1))
            self.pending.append((part, work))
        self.sent += t.numel() * t.element_size()
        while len(self.pending) > 2 * MAX_PENDING_SENDS:
            self._wait_oldest()

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        header = torch.empty(like.dim(), dtype=torch.int64, device=like.device)
        start = time.perf_counter()
        self.group.guarded("recv", dist.recv, header, self.peer(self.plan.stage - 1))
        order = header.tolist()
        buf = torch.empty([like.shape[d] for d in order], dtype=like.dtype, device=like.device)
        self.group.guarded("recv", dist.recv, buf, self.peer(self.plan.stage - 1))
        self.idle += time.perf_counter() - start
        return buf.permute([order.index(d) for d in range(like.dim())])

    def broadcast_from_last(self, tensor: torch.Tensor) -> None:
        """In place: the last stage's `tensor` on every stage of this replica's pipeline."""
        pipe = {} if self.pipe is None else {"group": self.pipe}
        self.group.guarded("broadcast", dist.broadcast, tensor, self.peer(len(self.plan.starts) - 1), **pipe)

    def share_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's `tensor` on every stage (a broadcast; the wait counts as idle)."""
        buf = tensor.detach().contiguous().clone()
        start = time.perf_counter()
        self.broadcast_from_last(buf)
        self.idle += time.perf_counter() - start
        self.sent += buf.numel() * buf.element_size() if self.plan.last else 0
        return buf

    def send_late(self, tensor: torch.Tensor) -> None:
        """Pipelined mode, last stage: this step's signal for the earlier stages (dfa: the output error; fg-a: the
        loss's directional derivatives) to each of them, without waiting; they take it steps later."""
        t = tensor.detach().contiguous()
        for s in range(len(self.plan.starts) - 1):
            self.late.append((t, self.group.guarded("isend", dist.isend, t, s)))
            self.sent += t.numel() * t.element_size()
        while len(self.late) > len(self.plan.starts) * (len(self.plan.starts) + MAX_PENDING_SENDS):
            self._wait_oldest(self.late)

    def recv_late(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Pipelined mode, an earlier stage: the last stage's next signal (in the order of the batches)."""
        buf = torch.empty(tuple(shape), dtype=dtype, device=device)
        start = time.perf_counter()
        self.group.guarded("recv", dist.recv, buf, len(self.plan.starts) - 1)
        self.idle += time.perf_counter() - start
        return buf

    def _wait_oldest(self, pending: list[tuple[torch.Tensor, Any]] | None = None) -> None:
        _, work = (self.pending if pending is None else pending).pop(0)
        start = time.perf_counter()
        self.group.guarded("send", work.wait)
        self.idle += time.perf_counter() - start

    def flush(self) -> None:
        while self.pending:
            self._wait_oldest()
        while self.late:
            self._wait_oldest(self.late)


class ProbeLink:
    """A Link stand-in for running a stage in one process: receives the given tensor (zeros where None), keeps
    what is sent."""

    def __init__(self, incoming: torch.Tensor | None):
        self.incoming = incoming
        self.sent: list[torch.Tensor] = []

    def send(self, tensor: torch.Tensor) -> None:
        self.sent.append(tensor)

    def recv(self, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like) if self.incoming is None else self.incoming

    def share_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def in_dual_pass() -> bool:
    """Whether a forward-mode pass is running (a `fwad.dual_level` is open): tangents then travel with the
    activations."""
    return fwad._current_level >= 0


@contextmanager
def running_stage(estimator: Estimator, plan: StagePlan, link: Link | ProbeLink,
                  stubs: list[tuple[nn.Module, Callable[..., Any]]], carry_tangents: bool = False,
                  share_output_tangent: bool = True) -> Iterator[None]:
    """While active, the model's forward is stage `plan.stage`'s: blocks outside it stubbed, the previous block's
    output received, the stage's last block's output sent. Registered before the rule's own boundary hooks (which
    the rule adds inside `step`), so they run after these and see the true values.

    `carry_tangents` (fdfa, fg-a): in a forward-mode pass the boundary's tangent travels beside it (zeros where it
    has none yet: adding them changes nothing), and every stage's model output takes the last stage's tangent, the
    output's directional derivative ẏ that the rule turns into its update (not in the pipelined mode, where the
    last stage sends on what it made of it)."""
    blocks = estimator.anatomy.blocks

    def receive(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        primal = link.recv(like=fwad.unpack_dual(out).primal)
        if carry_tangents and in_dual_pass():
            return fwad.make_dual(primal, link.recv(like=primal))
        return primal

    def send(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
        primal, tangent = fwad.unpack_dual(out)
        link.send(primal.detach())
        if carry_tangents and in_dual_pass():
            link.send(torch.zeros_like(primal) if tangent is None else tangent.detach())

    def output_tangent(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor | None:
        if not in_dual_pass():
            return None
        primal, tangent = fwad.unpack_dual(out)
        mine = torch.zeros_like(primal) if tangent is None else tangent.detach()
        return fwad.make_dual(primal, link.share_from_last(mine))

    handles = []
    if plan.start > 0:
        handles.append(blocks[plan.start - 1].exit.register_forward_hook(receive))
    if not plan.last:
        handles.append(blocks[plan.stop - 1].exit.register_forward_hook(send))
    if carry_tangents and share_output_tangent:
        handles.append(estimator.model.register_forward_hook(output_tangent))
    try:
        with forwards_replaced(stubs):
            yield
    finally:
        for h in handles:
            h.remove()


class _LastStageLoss(torch.autograd.Function):
    """The loss, and its gradient with respect to the logits, as the last stage computes them, on every stage: the
    rule differentiates its loss as usual and gets the last stage's output error (dfa's e, batch x classes)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, y: torch.Tensor, loss_fn: Any, share: Any) -> torch.Tensor:
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_()
            loss = loss_fn(leaf, y)
            (e,) = torch.autograd.grad(loss, leaf)
        loss, e = share(loss.detach(), e)
        ctx.save_for_backward(e)
        return loss

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (e,) = ctx.saved_tensors
        return g * e, None, None, None


@contextmanager
def shared_output_error(estimator: Estimator, link: Link) -> Iterator[None]:
    """While active, the estimator's loss (and so its output error) is the last stage's, broadcast to every stage
    once per step; the time a stage waits for it counts as idle."""
    original = estimator.loss_fn

    def share(loss: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed = torch.cat([loss.reshape(1).to(e.dtype), e.reshape(-1)])
        start = time.perf_counter()
        link.broadcast_from_last(packed)
        link.idle += time.perf_counter() - start
        link.sent += packed.numel() * packed.element_size() if link.plan.last else 0
        return packed[0].to(loss.dtype), packed[1:].view_as(e)

    estimator.loss_fn = lambda logits, y: _LastStageLoss.apply(logits, y, original, share)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del estimator.loss_fn


class _SendsDirectionalDerivatives:
    """Pipelined fg-w, last stage: stands in for the rule's group, whose weighted mean of the K directional
    derivatives d (seed-shared tangents: the step's one exchange across data-parallel ranks) is where d passes;
    sends it to the earlier stages on the way."""

    def __init__(self, group: Group, link: Link):
        self._group, self._link = group, link

    def weighted_mean_(self, tensors: Sequence[torch.Tensor], weight: float) -> None:
        self._group.weighted_mean_(tensors, weight)
        self._link.send_late(tensors[0])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)


@contextmanager
def late_signals_sent(estimator: Estimator, link: Link) -> Iterator[None]:
    """Pipelined mode, last stage: while active, every step's signal for the earlier stages is sent to them as the
    rule makes it (dfa: its output error e; fdfa: e and the output tangent ẏ side by side, batch x 2 classes, once
    the rule has both; fg-a: the loss's directional derivatives, K x batch; fg-w: its K directional derivatives)."""
    if isinstance(estimator, ForwardGradientWeight):
        group = estimator.group
        estimator.group = _SendsDirectionalDerivatives(group, link)  # type: ignore[assignment]
        try:
            yield
        finally:
            estimator.group = group
        return
    if isinstance(estimator, ForwardGradientActivity):
        original = estimator.directional_derivatives

        def sent(ydot: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            d = original(ydot, e)
            link.send_late(d)
            return d

        estimator.directional_derivatives = sent  # type: ignore[method-assign]
        try:
            yield
        finally:
            del estimator.directional_derivatives
        return
    loss_fn = estimator.loss_fn
    learns = isinstance(estimator, _DirectFeedback) and estimator.use_tangents
    signal: dict[str, torch.Tensor] = {}  # fdfa: e and ẏ of this step, in the order its feedback timing makes them

    def ready(kind: str, t: torch.Tensor) -> None:
        signal[kind] = t
        if len(signal) == 2:
            link.send_late(torch.cat([signal.pop("e"), signal.pop("y_dot")], 1))

    def share(loss: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if learns:
            ready("e", e)
        else:
            link.send_late(e)
        return loss, e

    estimator.loss_fn = lambda logits, y: _LastStageLoss.apply(logits, y, loss_fn, share)  # type: ignore[method-assign]
    if learns:
        learn = estimator.learn_feedback

        def learn_and_send(y_dot: torch.Tensor, tangents: list[torch.Tensor]) -> None:
            ready("y_dot", y_dot.detach())
            learn(y_dot, tangents)

        estimator.learn_feedback = learn_and_send  # type: ignore[method-assign]
    try:
        yield
    finally:
        del estimator.loss_fn
        if learns:
            del estimator.learn_feedback
