"""Local losses on any model with blocks (Ren, Kornblith, Liao, Hinton 2022): l-bp, l-fa, lg-bp, lg-fa, lg-fg-a,
lg-fg-w, read through the model's anatomy (`bpfree.core.anatomy`).

Every block output gets a local head owned by the estimator (pool -> Linear to the classes, sized from the anatomy's
probe pass; the model stays the plain network that `bp` trains) and the block is trained by that head's
cross-entropy only: one ordinary forward pass of `model(x)` in which every block output is remembered and replaced
by its detached copy (stop-gradient), then ONE backward over the readout's loss plus every block's local loss fills
every p.grad. Parameters in no block take their gradient from the next boundary downstream (a positional embedding
from the next block's loss; the model's classifier after the last block from the readout loss on stopped features).

- `l-fa`: as `l-bp` with feedback alignment inside each block: every Linear / Conv2d / MultiheadAttention
  projection in a block and every local head sends its error back through a fixed random B (`anatomy.uniform_like`).
- `lg-*`: the block + patch + group loss grid (`bpfree.losses.grid`). A block output [B, C, H, W] has H*W patches
  (spatial positions), [B, T, C] has T (tokens), [B, C] is one patch; `--groups G` channel groups (must divide the
  channels of every block output; 0 = the model's own `groups` attribute, else 1). Copy (p, g) of a block's loss has
  the pooled loss's value and its gradient reaches only patch p, group g of the block output.
  `lg-bp`/`lg-fa` backpropagate the grid through the block: backprop sums the copies, so the parameter gradients
  equal those of `l-bp`/`l-fa` (as on LocalMixer under the authors' definition, docs/localmixer.md); the grid
  changes the forward-gradient rules, which use its per-copy directional derivatives:
  `lg-fg-a` perturbs the output of every parametrised module inside a block (noise u, per example; a module whose
  output goes straight into a normalisation is perturbed after that norm instead, as the paper adds noise after the
  post-linear LayerNorm) and gives the module the estimate sum_k c[k, b, p, g] u[k, b, p, group g] where its output
  has the block output's patches and G | channels (the copy credited only at its own slice), the per-group sum over
  patches where only the channels split into G groups, the block's total otherwise; each module's (or norm +
  module's) weight gradient is its own vector-Jacobian product (inputs detached: nothing crosses a module).
  `lg-fg-w` perturbs every weight of a block (K tangents shared by the batch); copy (p, g) scales the rows of
  group g of a weight whose first dimension splits into G groups, every copy the rest. Both run in forward mode
  (torch.autograd.forward_ad), never from a backward pass.
  Parameters between blocks (positional embeddings) get no signal under `lg-fg-*` (zero gradient).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from bpfree.core import tangents as T
from bpfree.core.anatomy import (
    Anatomy,
    boundaries,
    eval_mode,
    example_input,
    init_uniform_,
    pool,
    positions_last,
    uniform_like,
)
from bpfree.core.attention import math_attention
from bpfree.core.errors import UsageError
from bpfree.core.forward_mode import lean_attention, renew_dual_level, tangent_friendly
from bpfree.core.registry import Option
from bpfree.losses import local_loss_grid
from bpfree.methods import METHODS
from bpfree.methods.base import (
    Buffers,
    Estimator,
    StepResult,
    add_grads,
    output_error,
    set_grads,
    zero_missing_grads,
)
from bpfree.methods.feedback_alignment import (
    _FALinear,
    check_layers,
    fa_weights,
    feedback_layers,
)

PAPER = "Ren, Kornblith, Liao, Hinton 2022 (arXiv 2210.03310)"
PAPER_LFA = "Ren, Kornblith, Liao, Hinton 2022 (arXiv 2210.03310), FA under their local losses"

COMMON_OPTIONS = {
    "objective": Option(
        "supervised",
        "local loss: cross-entropy, or contrastive (two views, NT-Xent; localmixer-* only)",
        choices=("supervised", "contrastive"),
    ),
    "temperature": Option(0.5, "NT-Xent temperature (contrastive objective)"),
    # The paper's code has both flags (head 1, readout 0.1); default 1 here: the README's rows were run with 1.
    "head_lr_mult": Option(1.0, "learning-rate multiplier of the local heads (paper: 1)", minimum=0),
    "readout_lr_mult": Option(1.0, "learning-rate multiplier of the readout / linear probe (paper: 0.1)", minimum=0),
}
LG_OPTIONS = {
    **COMMON_OPTIONS,
    "groups": Option(
        0, "channel groups of the patch x group loss grid (0: the model's own groups, e.g. localmixer's; else 1)",
        minimum=0,
    ),
}
FG_OPTIONS = {
    **LG_OPTIONS,
    "tangents": Option(1, "tangents K per step (drawn per example for activity perturbation)", minimum=1),
    "aggregation": Option(
        "mean", "combine the K directional derivatives: sum, mean, orthogonal (projection)", choices=T.AGGREGATIONS
    ),
    "tangent_dist": Option("rademacher", "tangent entries: rademacher (+-1) or normal", choices=T.DISTS),
}


def between_parameters(anatomy: Anatomy) -> list[nn.Parameter]:
    """Parameters in no block that some block output depends on (a positional embedding, a class token), found by
    one probe pass (eval mode, so batch-norm statistics stay untouched)."""
    free = anatomy.readout_parameters()
    if not free:
        return []
    model, outs = anatomy.model, []

    def keep(_i: int, out: torch.Tensor) -> torch.Tensor:
        outs.append(out)
        return out

    with eval_mode(model), torch.enable_grad(), boundaries(anatomy, keep):
        model(example_input(model, anatomy.input_shape))
        grads = torch.autograd.grad(sum(o.float().sum() for o in outs), free, allow_unused=True)
    return [p for p, g in zip(free, grads) if g is not None]


# ---------------------------------------------------------------------------------------------------------------
# Feedback alignment inside blocks (l-fa, lg-fa)


def block_fa_weights(anatomy: Anatomy, method: str) -> list[tuple[nn.Module, torch.Tensor]]:
    """`fa_weights` of the layers inside the blocks (the heads take their B separately; the readout none)."""
    check_layers(anatomy.model, method)
    inside = {id(s) for block in anatomy.blocks for m in block.modules for s in m.modules()}
    return [(m, w) for m, w in fa_weights(anatomy.model) if id(m) in inside]


# ---------------------------------------------------------------------------------------------------------------
# Estimators


class BlockLocal(Estimator):
    """l-bp on any model with two or more blocks; subclasses change the block loss (grid) or the backward (FA)."""

    method = "l-bp"
    uses_fa = False

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        name = type(model).__name__
        if self.options["objective"] != "supervised":
            raise UsageError(f"{self.method} on {name}: only --objective supervised (contrastive: localmixer-*)")
        anatomy = self.anatomy
        if len(anatomy.blocks) < 2:
            raise UsageError(f"{self.method} needs a model with two or more blocks; {name} has "
                             f"{len(anatomy.blocks)} ({self.blocks_hint()})")
        self.head_lr_mult = self.options["head_lr_mult"]
        self.readout_lr_mult = self.options["readout_lr_mult"]
        param = next(model.parameters())
        self.heads = self.parts.heads = nn.ModuleList(nn.Linear(c, anatomy.num_classes)
                                                      for c in anatomy.block_widths())
        self.heads.to(param.device, param.dtype)
        for head in self.heads:
            init_uniform_(list(head.parameters()), head.in_features, self.generator)
        between = between_parameters(anatomy)
        self.readout = [p for p in anatomy.readout_parameters() if all(p is not q for q in between)]
        # What block i's local loss may reach: its own parameters, its head, parameters between blocks.
        self.local_params = [b.parameters() + list(h.parameters()) + between
                             for b, h in zip(anatomy.blocks, self.heads)]
        self.fa_weights = block_fa_weights(anatomy, self.method) if self.uses_fa else []
        self.feedback = self.parts.feedback = Buffers(
            [uniform_like(w, w[0].numel(), self.generator) for _, w in self.fa_weights])
        self.head_feedback = self.parts.head_feedback = Buffers(
            [uniform_like(h.weight, h.in_features, self.generator) for h in self.heads] if self.uses_fa else [])

    def head(self, i: int, pooled: torch.Tensor) -> torch.Tensor:
        h = self.heads[i]
        if self.uses_fa:
            return _FALinear.apply(pooled, h.weight, h.bias, self.head_feedback[i])
        return h(pooled)

    def local_loss(self, i: int, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what block i's backward differentiates, the local loss to report)."""
        loss = F.cross_entropy(self.head(i, pool(out)), y)
        return loss, loss

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        reported: list[float] = []

        def learn(i: int, out: torch.Tensor) -> torch.Tensor:
            # Block at a time: block i's local backward runs at its boundary, inside the model's own forward, so its
            # graph is freed before block i + 1 starts (activation memory: one block's, flat in depth).
            objective, loss = self.local_loss(i, out, y)
            add_grads(objective, self.local_params[i])
            reported.append(float(loss.detach()))
            return out.detach()

        params = self.trainable()
        for p in params:
            p.grad = None
        fa = feedback_layers(self.model, self.fa_weights, self.feedback) if self.uses_fa else nullcontext()
        with torch.enable_grad(), boundaries(self.anatomy, learn), fa:
            logits = self.model(x)
            loss = self.loss_fn(logits, y)
            add_grads(loss, self.anatomy.readout_parameters())
        zero_missing_grads(params)
        return StepResult(loss.detach(), logits.detach(), {f"local_loss_{i}": v for i, v in enumerate(reported)})

    def trainable(self) -> list[nn.Parameter]:
        return super().trainable() + list(self.heads.parameters())

    def lr_multipliers(self) -> list[tuple[list[nn.Parameter], float]]:
        return [(list(self.heads.parameters()), self.head_lr_mult), (self.readout, self.readout_lr_mult)]


class BlockLocalGrid(BlockLocal):
    """The lg-* rules' shared part: groups, patches, and the grid of every block output."""

    method = "lg-bp"

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        self.groups = self.options["groups"] or int(getattr(model, "groups", 1) or 1)
        for block, width in zip(self.anatomy.blocks, self.anatomy.block_widths()):
            if width % self.groups:
                raise UsageError(f"{self.method}: --groups {self.groups} does not divide the {width} channels of "
                                 f"block {block.name!r}")

    @staticmethod
    def patches(out: torch.Tensor) -> torch.Tensor:
        """A block output as [B, P, C]: a [B, C] output is one patch."""
        return out.unsqueeze(1) if out.dim() == 2 else positions_last(out)

    def grid(self, i: int, out: torch.Tensor, y: torch.Tensor):  # noqa: ANN201 - a LossGrid
        return local_loss_grid(self.patches(out), self.groups,
                               lambda pooled: F.cross_entropy(self.head(i, pooled), y, reduction="none"),
                               features=lambda h: h.mean(-2))  # the head pools over patches: slots stay apart

    def local_loss(self, i: int, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.patches(out)
        grid = self.grid(i, out, y)
        loss = grid.per_example.mean()
        # The block's signal: the sum over copies (mean over the batch) of each copy's gradient, which reaches only
        # its own slice of h; the head's gradient from the ordinary loss (every copy shares the head, whose gradient
        # the grid would otherwise count P x G times).
        copies = (h * grid.output_grad()).sum() / h.shape[0]
        return copies + loss, loss


class BlockLocalFG(BlockLocalGrid):
    """lg-fg-a / lg-fg-w: exact heads and readout, forward-mode directional derivatives for the blocks."""

    acts_on_layer_calls = True

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        o = self.options
        self.tangents, self.aggregation, self.dist = o["tangents"], o["aggregation"], o["tangent_dist"]
        self.block_params = [[p for p in b.parameters() if p.requires_grad] for b in self.anatomy.blocks]

    def sample(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return T.sample(shape, self.dist, self.generator, device=like.device, dtype=like.dtype)

    def coefficients(self, d: torch.Tensor, noise: list[torch.Tensor], per_example: bool) -> torch.Tensor:
        """c [K, ...] from one block's directional derivatives d [K, (B,) P, G]; orthogonal: the Gram matrix of the
        block's tangents as drawn (one per example for activity tangents) applied to every copy."""
        if self.aggregation != "orthogonal":
            return T.coefficients(d, self.aggregation)
        gram = T.gram(noise, per_example=per_example, entries=T.entries(self.dist))
        return T.coefficients(d, self.aggregation, gram, T.dimension(noise, per_example=per_example))

    def head_grid(self, i: int, out: torch.Tensor, y: torch.Tensor, learn: bool = True):  # noqa: ANN201
        """Block i's loss grid on its stopped output [B, ...]; with `learn`, the head's exact gradient is added now
        (the head sees stopped features only) and the local loss recorded."""
        with torch.enable_grad():
            grid = self.grid(i, out.detach(), y)
            if learn:
                local = grid.per_example.mean()
                add_grads(local, list(self.heads[i].parameters()))
                self._reported[i] = float(local.detach())
        return grid

    def readout_step(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss, and the readout's exact gradient from dL/dlogits through the readout's own graph (`logits`
        [K*B, classes] must carry it; the first B rows are the unperturbed batch)."""
        batch = y.shape[0]
        loss, e = output_error(self, logits[:batch], y)
        readout = [p for p in self.readout if p.requires_grad]
        if readout:
            set_grads(readout, torch.autograd.grad(logits[:batch], readout, e, allow_unused=True))
        return loss

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        for p in self.trainable():
            p.grad = None
        self._reported: dict[int, float] = {}
        with math_attention():  # forward-mode AD needs the math attention kernel
            loss, logits = self.forward_step(x, y)
        zero_missing_grads(self.trainable())
        extra = {f"local_loss_{i}": v for i, v in sorted(self._reported.items())}
        return StepResult(loss, logits, extra)

    def forward_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill the blocks' gradients block at a time, inside the model's forward; returns (loss, logits)."""
        raise NotImplementedError


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def _unit_modules(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules inside a block that activity perturbation perturbs: those with parameters of their own, and
    normalisations (which may join the module before them, see `_feeds_norm`)."""
    out = []
    for m in modules:
        for s in m.modules():
            if (isinstance(s, NORMS) or any(True for _ in s.parameters(recurse=False))) and s not in out:
                out.append(s)
    return out


def _feeds_norm(anatomy: Anatomy, units: list[nn.Module]) -> dict[nn.Module, nn.Module]:
    """norm -> the unit whose output is the norm's input, found by one probe pass (eval mode, no grad).

    The noise then goes after the normalisation, and its estimate goes back through the normalisation and that
    unit (the paper's recipe: noise after the post-linear LayerNorm, back through that LN and the linear). Noise
    before a batch norm would be credited per example although batch statistics couple the examples.
    """
    produced: dict[int, nn.Module] = {}
    kept: list[torch.Tensor] = []  # hold the outputs so that their ids stay unique during the pass
    pairs: dict[nn.Module, nn.Module] = {}
    handles = []
    for m in units:
        def after(mod: nn.Module, _args: tuple, out: Any) -> None:
            first = out[0] if isinstance(out, tuple) else out
            kept.append(first)
            produced[id(first)] = mod

        def before(mod: nn.Module, args: tuple) -> None:
            if isinstance(mod, NORMS) and args and id(args[0]) in produced:
                pairs[mod] = produced[id(args[0])]

        handles += [m.register_forward_hook(after), m.register_forward_pre_hook(before)]
    model = anatomy.model
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input(model, anatomy.input_shape))
    finally:
        for h in handles:
            h.remove()
    return pairs


class BlockLocalFGActivity(BlockLocalFG):
    method = "lg-fg-a"

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        self._scratch = torch.Generator(device=self.generator.device)
        self.units = [_unit_modules(b.modules) for b in self.anatomy.blocks]
        self.joined = _feeds_norm(self.anatomy, [m for us in self.units for m in us])  # norm -> the unit before it
        self.silent = set(self.joined.values())  # units perturbed after their norm only

    def sample(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Per-example tangents for K stacked copies of the batch (data-parallel: this rank's rows of the global
        batch's, so each example gets the tangents one process would give it)."""
        out = torch.empty(shape, device=like.device, dtype=like.dtype)
        return self.sample_rows_(lambda t: T.sample_(t, self.dist, self._scratch), out, self.tangents)

    def forward_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per-example tangents from a stream seeded afresh each step (alike on every rank; resumable).
        self._scratch.manual_seed(self.draw_seed())
        k, batch = self.tangents, x.shape[0]
        xk = x.repeat(k, *([1] * (x.dim() - 1)))  # K copies of the batch: independent tangents per copy
        # Per block, its units' records: (unit, the edge of its output in the unit's reverse graph, how to draw its
        # tangents u again).
        fired: list[list[tuple[nn.Module, GradientEdge, _Draw]]] = [[] for _ in self.anatomy.blocks]

        def perturb(i: int):  # noqa: ANN202
            def hook(m: nn.Module, _args: tuple, out: Any) -> Any:
                if m in self.silent:
                    return None
                first = out[0] if isinstance(out, tuple) else out
                primal, tangent = fwad.unpack_dual(first)
                draw = _Draw(self._scratch.get_state(), tuple(primal.shape), primal.new_empty(0))
                u = self.sample(draw.shape, primal)
                # Kept for the unit's VJP: the edge of its output in its reverse graph, not the output (a dual, or a
                # view of one, kept to the end of the block would hold its tangent, and that tangent, made in grad
                # mode, the unit's tangent arithmetic), and the generator state its u was drawn from, not u: u is
                # drawn again at the boundary. The pass goes on with detached copies of primal and tangent.
                fired[i].append((m, get_gradient_edge(primal), draw))
                onward = u if tangent is None else tangent.detach() + u
                dual = fwad.make_dual(primal.detach(), onward)
                return (dual, *out[1:]) if isinstance(out, tuple) else dual
            return hook

        def learn(i: int, out: torch.Tensor) -> torch.Tensor:
            # Block at a time: block i's estimate is formed at its boundary and its units' records dropped.
            primal, tangent = fwad.unpack_dual(out)
            records, fired[i] = fired[i], []
            d = self._directional(i, primal, torch.zeros_like(primal) if tangent is None else tangent, y)
            onward = primal.detach()
            del out, primal, tangent
            # The next block starts without tangents: this block's die now, before its units' VJPs (the units'
            # graphs would otherwise hold their outputs' tangents through them).
            renew_dual_level()
            self._learn_units(d, records)
            if i == len(self.units) - 1:
                torch.set_grad_enabled(True)  # the readout learns from its own graph (the pass restores the mode)
            return onward

        # Only a unit's own arithmetic is recorded for its VJP: the rest of the pass (between units, and the
        # tangents there) runs without a reverse graph.
        modes: list[bool] = []

        def enter(_m: nn.Module, _args: tuple) -> None:
            modes.append(torch.is_grad_enabled())
            torch.set_grad_enabled(True)

        def leave(_m: nn.Module, _args: tuple, _out: Any) -> None:
            torch.set_grad_enabled(modes.pop())

        # A silent unit that is a linear map (a convolution or Linear whose output goes straight into a norm) is
        # run again from its input when the norm's VJP needs that output: the norm's graph does not keep it through
        # the block. Its input is kept anyway (the unit's own VJP needs it).
        pending: list[tuple[tuple, nn.Module, torch.Tensor]] = []

        def remember(m: nn.Module, args: tuple, out: Any) -> None:
            if isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
                pending[:] = [(_address(fwad.unpack_dual(out).primal), m, fwad.unpack_dual(args[0]).primal)]

        def pack(t: torch.Tensor) -> Any:
            # Only the next tensor saved after the unit's output is made can be that output as its norm saves it.
            # Anything else is kept detached: a saved output kept with its grad_fn would make a reference cycle,
            # freed only by the garbage collector.
            mine = pending and pending[0][0] == _address(t)
            recipe = _Rerun(pending[0][1], pending[0][2]) if mine else t.detach()
            pending.clear()
            return recipe

        def unpack(saved: Any) -> torch.Tensor:
            return saved() if isinstance(saved, _Rerun) else saved

        handles = []
        for i, units in enumerate(self.units):
            for m in units:
                handles.append(m.register_forward_pre_hook(enter))
                handles.append(m.register_forward_pre_hook(self._detach_inputs, with_kwargs=True))
                handles.append(m.register_forward_hook(perturb(i)))
                handles.append(m.register_forward_hook(leave))
                if m in self.silent and isinstance(m, RERUNNABLE):
                    handles.append(m.register_forward_hook(remember))
        try:
            # Convolutions and batch norms with lean tangent rules (one convolution; one kernel for batch norm,
            # instead of a chain of batch-sized temporaries that a unit's reverse graph would keep to the block's end).
            with fwad.dual_level(), torch.no_grad(), tangent_friendly(self.model), boundaries(self.anatomy, learn), \
                    torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                logits = fwad.unpack_dual(self.model(xk)).primal
        finally:
            for h in handles:
                h.remove()
        return self.readout_step(logits, y), logits[:batch].detach()

    def _detach_inputs(self, m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """A unit's inputs cut from the reverse graph (its VJP stays inside it), tangents kept."""
        if m in self.joined:  # a norm after a unit: its estimate goes back through that unit too
            return None

        def cut(a: Any) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            primal, tangent = fwad.unpack_dual(a)
            return primal.detach() if tangent is None else fwad.make_dual(primal.detach(), tangent)
        return tuple(cut(a) for a in args), {key: cut(v) for key, v in kwargs.items()}

    def _directional(self, i: int, out: torch.Tensor, tangent: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Block i's head (exact) and the grid's directional derivatives d [K, B, P, G] along its output tangent."""
        k, batch = self.tangents, y.shape[0]
        grid = self.head_grid(i, out[:batch], y)
        with torch.no_grad():
            h_dot = self.patches(tangent.detach()).unflatten(0, (k, batch))  # [K, B, P, C]
            return grid.directional(h_dot) / batch  # mean over the batch of the sum over copies

    def _learn_units(self, d: torch.Tensor, fired: list[tuple[nn.Module, GradientEdge, _Draw]]) -> None:
        """A block's units' gradients from its grid's directional derivatives d [K, B, P, G]."""
        k, batch = d.shape[0], d.shape[1]
        with torch.no_grad():
            resume = self._scratch.get_state()
            # Orthogonal aggregation needs every tangent of the block for its Gram matrix; the others none.
            noise = [self._redraw(r) for _, _, r in fired] if self.aggregation == "orthogonal" else []
            c = self.coefficients(d, [u.unflatten(0, (k, batch)) for u in noise], per_example=True)
        units = [m for m, _, _ in fired]
        owned = _owned_parameters(units + [self.joined[m] for m in units if m in self.joined])
        got: dict[int, torch.Tensor] = {}
        params: dict[int, nn.Parameter] = {}
        # One unit at a time: its tangents u are drawn again and its estimate written over them, its VJP runs, and
        # its record is dropped before the next unit's, so at most one unit's estimate and VJP are alive.
        while fired:
            m, o, draw = fired.pop(0)
            mine = owned[m] + (owned[self.joined[m]] if m in self.joined else [])
            with torch.no_grad():
                u = noise.pop(0) if noise else self._redraw(draw)
                est = self._estimate_(c, u, d.shape[2], self.groups)
            del u
            if mine:
                with torch.enable_grad():
                    grads = torch.autograd.grad(o, mine, est, allow_unused=True)
                for p, g in zip(mine, grads):
                    if g is not None:
                        got[id(p)] = g if id(p) not in got else got[id(p)] + g
                    params[id(p)] = p
            del m, o, est
        self._scratch.set_state(resume)  # the next block's tangents come from where the pass left the stream
        set_grads(list(params.values()), [got.get(key) for key in params])

    def _redraw(self, draw: _Draw) -> torch.Tensor:
        """A unit's tangents u again, bit for bit: the same generator state, shape and rows."""
        self._scratch.set_state(draw.state)
        return self.sample(draw.shape, draw.like)

    def _estimate_(self, c: torch.Tensor, u: torch.Tensor, patches: int, g: int) -> torch.Tensor:
        """c u per tangent, written over the noise u of one module's output ([K*B, *S], the rows of the K copies of
        the batch): copy (p, g) credited at its own slice where the output has the block's patches and G | its
        channels, per group (summed over patches) where only the channels split, the block's total otherwise."""
        rows, shape = u.shape[0], u.shape[1:]
        channels = shape[-1] if len(shape) <= 2 else shape[0]
        positions = 1 if len(shape) == 1 else (shape[0] if len(shape) == 2 else u[0, 0].numel())
        if channels % g == 0 and positions == patches:
            coef = c.flatten(0, 1)  # [K*B, P, G]
        elif channels % g == 0:
            coef = c.sum(2, keepdim=True).flatten(0, 1)  # [K*B, 1, G]
        else:
            coef = c.sum((2, 3)).flatten(0, 1)[:, None, None]  # [K*B, 1, 1]
        groups = coef.shape[-1]
        if len(shape) <= 2:  # [K*B, (T,) C]: channels last
            u.view(rows, -1, groups, channels // groups).mul_(coef.unsqueeze(-1))
        else:  # [K*B, C, *spatial]: channels first, positions flattened
            u.view(rows, groups, channels // groups, -1).mul_(coef.transpose(1, 2).unsqueeze(2))
        return u


# Silent units whose output `_Rerun` may make again: stateless and deterministic, the same bits a second time.
RERUNNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _address(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


@dataclass
class _Rerun:
    """A unit's output, saved as the unit and its input: made again (the unit's forward without its hooks) when a
    VJP unpacks it."""

    unit: nn.Module
    input: torch.Tensor

    def __call__(self) -> torch.Tensor:
        with torch.no_grad():
            return self.unit.forward(self.input)


@dataclass
class _Draw:
    """Where a unit's tangents came from: the generator state before the draw, their shape, dtype and device."""

    state: torch.Tensor
    shape: tuple[int, ...]
    like: torch.Tensor  # empty, of the tangents' dtype and device


def _owned_parameters(modules: list[nn.Module]) -> dict[nn.Module, list[nn.Parameter]]:
    """Each fired module's trainable parameters, less those of fired modules inside it (their own VJPs)."""
    fired = set(modules)
    owned = {}
    for m in modules:
        inner = {id(p) for s in m.modules() if s is not m and s in fired for p in s.parameters()}
        owned[m] = [p for p in m.parameters() if p.requires_grad and id(p) not in inner]
    return owned


class BlockLocalFGWeight(BlockLocalFG):
    method = "lg-fg-w"

    def forward_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, batch = self.tangents, x.shape[0]
        names = {id(p): n for n, p in self.model.named_parameters()}
        params = [p for ps in self.block_params for p in ps]
        noise = [self.sample((k, *p.shape), p) for p in params]
        # Parameters in no block and not in the readout (a positional embedding) get no signal from this rule: they
        # go in detached, or the first pass would record a reverse graph through the first block for them.
        learning = {id(p) for p in params + self.readout}
        fixed = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in learning}
        # Per block, the K passes' grid derivatives summed over the batch: [P, G] each (only the batch sum matters).
        d_all: list[list[torch.Tensor]] = [[] for _ in self.anatomy.blocks]
        logits = torch.empty(0)
        for j in range(k):
            def learn(i: int, out: torch.Tensor, first: bool = j == 0) -> torch.Tensor:
                # Block at a time: the block's grid (its head learns in the first pass) and derivative, then on.
                primal, tangent = fwad.unpack_dual(out)
                grid = self.head_grid(i, primal, y, learn=first)
                if tangent is not None:
                    with torch.no_grad():
                        d_all[i].append((grid.directional(self.patches(tangent.detach())) / batch).sum(0))
                else:
                    d_all[i].append(primal.new_zeros(grid.output_slope.shape[1], self.groups))
                return primal.detach()

            # The first pass keeps the readout's graph (after the last cut only the readout has parameters that
            # require grad; the blocks' are dual copies), for its exact gradient.
            with fwad.dual_level(), torch.set_grad_enabled(j == 0), lean_attention(), \
                    boundaries(self.anatomy, learn):
                duals = fixed | {names[id(p)]: fwad.make_dual(p.detach(), v[j]) for p, v in zip(params, noise)}
                out = torch.func.functional_call(self.model, duals, (x,), strict=False)
                if j == 0:
                    logits = fwad.unpack_dual(out).primal
        loss = self.readout_step(logits, y)
        with torch.no_grad():
            start = 0
            for i, ds in enumerate(d_all):
                d = torch.stack(ds)  # [K, P, G]
                self.group.weighted_mean_([d], batch)  # data-parallel: seed-shared tangents
                block_noise = noise[start:start + len(self.block_params[i])]
                self._weight_grads(self.block_params[i], block_noise, self.coefficients(d, block_noise, False))
                start += len(self.block_params[i])
        return loss, logits.detach()

    def _weight_grads(self, params: list[nn.Parameter], noise: list[torch.Tensor], c: torch.Tensor) -> None:
        """Copy (p, g) scales the rows of group g of a weight whose first dimension splits into G groups; every
        copy scales the rest."""
        k, g = c.shape[0], self.groups
        for p, v in zip(params, noise):
            if p.dim() >= 1 and p.shape[0] % g == 0:
                coef = c.sum(1).repeat_interleave(p.shape[0] // g, dim=1)  # [K, rows]: group g's rows
                p.grad = (coef.view(*coef.shape, *([1] * (p.dim() - 1))) * v).sum(0)
            else:
                p.grad = (c.sum((1, 2)).view(k, *([1] * p.dim())) * v).sum(0)


# ---------------------------------------------------------------------------------------------------------------
# Registration (LocalMixer registers faster equivalents: `bpfree.fastpaths.localmixer_local`)


@METHODS.register(
    "l-bp",
    "block-wise local losses, backprop inside each block, stop-gradient between blocks",
    options=COMMON_OPTIONS,
    paper=PAPER,
)
class BlockLocalBP(BlockLocal):
    method = "l-bp"


@METHODS.register(
    "l-fa",
    "feedback alignment inside each block under block-wise local losses (l-bp with random feedback)",
    options=COMMON_OPTIONS,
    paper=PAPER_LFA,
)
class BlockLocalFA(BlockLocal):
    method = "l-fa"
    acts_on_layer_calls = True
    uses_fa = True


@METHODS.register(
    "lg-bp",
    "backprop of block + patch + group local losses (the exact LG gradient)",
    options=LG_OPTIONS,
    paper=PAPER,
)
class BlockLocalGroupBP(BlockLocalGrid):
    method = "lg-bp"


@METHODS.register(
    "lg-fa",
    "feedback alignment under the block + patch + group local losses (lg-bp with random feedback)",
    options=LG_OPTIONS,
    paper=PAPER_LFA,
)
class BlockLocalGroupFA(BlockLocalGrid):
    method = "lg-fa"
    acts_on_layer_calls = True
    uses_fa = True


METHODS.register(
    "lg-fg-a",
    "forward gradient, activity perturbation, against the block+patch+group loss grid",
    options=FG_OPTIONS,
    paper=PAPER,
)(BlockLocalFGActivity)
METHODS.register(
    "lg-fg-w",
    "forward gradient, weight perturbation, against the block+patch+group loss grid",
    options=FG_OPTIONS,
    paper=PAPER,
)(BlockLocalFGWeight)
