"""The one interface every learning rule implements.

An estimator fills `p.grad` of every trainable parameter of its model from one batch (and touches nothing
else); the optimizer step is the caller's. The training loop only ever calls `step`, `predict`,
`state_dict` and `load_state_dict`, and in data-parallel runs `all_reduce_gradients`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core.anatomy import Anatomy, describe
from bpfree.core.errors import UsageError
from bpfree.core.group import LOCAL, Group, Shard
from bpfree.core.registry import Option, resolve_options

#: Shared by the rules that can trade one more forward pass for memory (dfa, fdfa, fg-a).
RECOMPUTE = Option(
    False, "a second forward pass regenerates what the first would keep, and each block's (layer's) gradient is "
    "formed and dropped at once: activation memory flat in depth, one more forward pass"
)


@dataclass
class StepResult:
    """What one training step reports. `loss` is a detached scalar tensor, `logits` detached [batch, classes]."""

    loss: torch.Tensor
    logits: torch.Tensor
    extra: dict[str, float] | None = None


def estimator_seed(seed: int) -> int:
    """The seed of an estimator's generator, kept away from `seed` itself.

    Runs seed the model's initialisation with the same number (torch.manual_seed(seed)); a generator seeded
    identically would replay the init's random numbers (feedback alignment would draw B equal to W and silently be
    backprop; tangents would correlate with the weights). Mixing in constants avoids that.
    """
    return (seed * 0x9E3779B1 + 0xFA) % 2**63


def set_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """`p.grad = g` for a trainable parameter (frozen ones keep no gradient)."""
    if p.requires_grad:
        p.grad = g


def set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """Each parameter's gradient, zeros where a rule gave none (a parameter its signal does not reach)."""
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else g


def add_grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Add d loss / d p into every p.grad now (a local backward: it frees the loss's graph at once, so a rule that
    calls it at each block boundary holds one block's graph at a time). Parameters the loss does not reach keep
    their gradient."""
    params = [p for p in params if p.requires_grad]
    if not params or not loss.requires_grad:
        return
    for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True)):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def zero_missing_grads(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def output_error(est: Estimator, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the output error e = dL/dlogits: autograd through the loss function only, never through a
    layer (so any loss_fn works); both detached."""
    leaf = logits.detach().requires_grad_()
    with torch.enable_grad():
        loss = est.loss_fn(leaf, y)
        (e,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), e


def rank_seed(seed: int, rank: int) -> int:
    """A per-step seed made distinct per data-parallel rank (per-example tangents must differ across ranks)."""
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**63


def rng_state(device: torch.device) -> list[torch.Tensor]:
    """The global RNG state(s) a model's forward draws from (dropout): CPU, and the device's on CUDA."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def set_rng_state(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


@contextmanager
def rng_as(states: list[torch.Tensor], device: torch.device) -> Iterator[None]:
    """The global RNG as in `states` for a while (a rerun of a module draws its forward's dropout masks), then as
    it was."""
    now = rng_state(device)
    set_rng_state(states, device)
    try:
        yield
    finally:
        set_rng_state(now, device)


class Replay:
    """A second forward pass that sees what the first saw: taken before the first pass, `again()` runs a block with
    the global RNG (dropout) as it was then and puts the model's buffers (batch-norm running statistics) and the RNG
    back as the first pass left them, so recomputing changes nothing but memory."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.rng = rng_state(device)

    @contextmanager
    def again(self) -> Iterator[None]:
        kept = [(b, b.clone()) for b in self.model.buffers()]
        try:
            with rng_as(self.rng, self.device):
                yield
        finally:
            with torch.no_grad():
                for b, before in kept:
                    b.copy_(before)


class Buffers(nn.Module):
    """Tensors an estimator keeps besides the model (feedback matrices, running means) as buffers, so that
    `state_dict`, `load_state_dict` and `.to()` carry them. Indexed by position or by name; filled at once or
    lazily (a checkpoint loaded into an empty one makes its entries)."""

    def __init__(self, tensors: Sequence[torch.Tensor] | dict[str, torch.Tensor] = ()):
        super().__init__()
        for key, t in tensors.items() if isinstance(tensors, dict) else enumerate(tensors):
            self[key] = t

    @staticmethod
    def _name(key: int | str) -> str:
        return str(key).replace(".", ":")  # a buffer name may not hold dots; parameter names do

    def __getitem__(self, key: int | str) -> torch.Tensor:
        if isinstance(key, int) and key < 0:
            key += len(self)
        return self._buffers[self._name(key)]  # type: ignore[return-value]

    def __setitem__(self, key: int | str, t: torch.Tensor) -> None:
        self.register_buffer(self._name(key), t)

    def append(self, t: torch.Tensor) -> None:
        self[len(self)] = t

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (int, str)) and self._name(key) in self._buffers

    def keys(self) -> list[str]:
        return [name.replace(":", ".") for name in self._buffers]

    def get(self, key: int | str) -> torch.Tensor | None:
        return self._buffers.get(self._name(key))

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self) -> Iterator[torch.Tensor]:  # type: ignore[override]
        return iter(self._buffers.values())  # type: ignore[arg-type]

    def _load_from_state_dict(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = {key[len(prefix):]: value for key, value in state.items()
                 if key.startswith(prefix) and "." not in key[len(prefix):]}
        for name in [n for n in self._buffers if n not in saved]:
            del self._buffers[name]  # made after that state was saved
        for name, value in saved.items():
            if name not in self._buffers:
                self.register_buffer(name, torch.empty_like(value))
        super()._load_from_state_dict(state, prefix, *args)


class OptimizerState(nn.Module):
    """A torch.optim optimizer an estimator runs on its own parts (FDFA's B), made at first use; its state rides
    in the owner's `state_dict` (and one is made from it on load: `make` is called with no optimizer yet)."""

    def __init__(self) -> None:
        super().__init__()
        self.optimizer: torch.optim.Optimizer | None = None
        self.make: Callable[[], None] | None = None

    def get_extra_state(self) -> dict[str, Any] | None:
        return None if self.optimizer is None else self.optimizer.state_dict()

    def set_extra_state(self, state: dict[str, Any] | None) -> None:
        self.optimizer = None
        if state is not None:
            assert self.make is not None
            self.make()
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state)


class Estimator:
    """Base class: subclasses override `step` (and `predict` when inference is not `model(x)`).

    State beyond the model's parameters lives in `self.parts` (an nn.Module: local heads, feedback matrices as
    `Buffers`, running means, a feedback optimizer's state via `get_extra_state`), so `state_dict`, `.to()` and
    checkpoints come from PyTorch; the generator's state is saved beside it.
    """

    #: The options this rule declares where it is registered (`METHODS.register` / `register_fast_path` set it);
    #: `self.options` holds their values, defaults filled. None: an unregistered estimator takes options as given.
    declared: ClassVar[dict[str, Option] | None] = None
    #: Whether the rule acts on a layer by replacing its forward (feedback alignment's B, activity tangents): `build`
    #: then refuses a model that uses a layer's weight without calling the layer.
    acts_on_layer_calls: ClassVar[bool] = False
    #: The data-parallel ranks this estimator's steps are combined over; the trainer sets it (LOCAL: one process).
    group: Group = LOCAL
    #: Data-parallel: this rank's rows of the step's global batch (the trainer sets it before each step; None on one
    #: process).
    shard: Shard | None = None

    def __init__(self, model: nn.Module, seed: int = 0, *, blocks: Sequence[str] | None = None, **options: Any):
        self.model = model
        declared = type(self).declared
        self.options = dict(options) if declared is None else \
            resolve_options(declared, options, f"method {type(self).__name__}")
        self.block_names = tuple(blocks) if blocks else None
        # Estimators draw their own randomness (tangents, feedback matrices) from this generator so that
        # it can be checkpointed and a resumed run continues exactly.
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(estimator_seed(seed))
        self.parts = nn.Module()

    @cached_property
    def anatomy(self) -> Anatomy:
        """The model's layers and blocks (found once, on first use; `blocks=` names them)."""
        return describe(self.model, blocks=self.block_names)

    def blocks_hint(self) -> str:
        """What to do about too few blocks: name them, or name more where --blocks was given."""
        if self.block_names is None:
            return "name them with --blocks"
        return f"--blocks named {len(self.block_names)}; name more"

    def draw_seed(self) -> int:
        """A fresh seed from the estimator's generator, for a stream of tangents regenerated or offset per rank
        (every rank draws it alike, so a resumed run replays it)."""
        return int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def lr_multipliers(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        """(parameters, learning-rate multiplier) pairs, for parameters of `trainable()`; the rest get 1.

        The trainer gives each multiplier its own optimizer parameter group (lr = multiplier x --lr), so the
        schedule, which scales every group's base lr by the same factor, keeps the ratios.
        """
        return []

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        raise NotImplementedError

    def all_reduce_gradients(self, group: Group, weight: float) -> None:
        """Data-parallel policy, called by the trainer after `step` on every rank (`weight`: local examples).

        Default: average every p.grad over the ranks, weighted by their shares of the batch, so that every rank holds
        the gradient of the whole global batch's mean loss: O(parameters) bytes. Estimators that can do with less
        (forward gradients with seed-shared tangents: K numbers) combine inside `step` via `self.group` and override
        this to reduce only what is left.
        """
        group.weighted_mean_([p.grad for p in self.trainable()], weight)

    def reduced_state(self) -> list[torch.Tensor]:
        """Learned state besides the parameters (ff's running means) that differs by the examples a rank saw.

        In data-parallel runs the trainer averages these tensors in place over the ranks after every step, weighted
        by each rank's examples, so every rank (and the checkpoint, written by rank 0) holds the same state; where the
        state is a running mean of batch means, that is the state one process would hold. Default: none.
        """
        return []

    def sample_rows_(self, fill_: Callable[[torch.Tensor], torch.Tensor], out: torch.Tensor,
                     copies: int = 1) -> torch.Tensor:  # fmt: skip
        """`fill_(out)`: per-example random numbers, one row per example of this rank's batch (`copies` stacked
        copies of the batch: `out` is [copies * rows, ...] or [copies, rows, ...]).

        Data-parallel: every rank draws the numbers of the whole global batch and keeps its own rows, so each
        example gets the numbers one process would give it and every rank's generator advances alike.
        """
        rows = self.shard
        if rows is None or rows.stop - rows.start == rows.total:
            return fill_(out)
        # Contiguous [copies, rows, rest] has the memory order of both layouts: the draws land as one process's.
        local = out.view(copies, rows.stop - rows.start, -1)
        whole = fill_(out.new_empty((copies, rows.total, local.shape[2])))
        local.copy_(whole[:, rows.start : rows.stop])
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation (the model is put in eval mode by the caller)."""
        with torch.no_grad():
            return self.model(x)

    def state_dict(self) -> dict[str, Any]:
        """Estimator state beyond the model's parameters: the generator and `parts` (a copy: training on does not
        change it)."""
        return {"generator": self.generator.get_state(), "parts": copy.deepcopy(self.parts.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "parts" not in state:
            raise UsageError("the estimator state was saved by an older bpfree (before 0.2); start a new run")
        self.generator.set_state(state["generator"])
        device = next(self.model.parameters()).device  # entries made while loading are made here
        self.parts.load_state_dict({k: v.to(device) if isinstance(v, torch.Tensor) else v
                                    for k, v in state["parts"].items()})
