"""LocalMixer's fast paths for the local rules (Ren, Kornblith, Liao, Hinton 2022): l-bp, lg-bp, lg-fg-w, lg-fg-a,
and the end-to-end fg-w / fg-a baselines, each registered with `methods.register_fast_path` (the generic rules, for
any model: `bpfree.methods.block_local`, `bpfree.methods.forward_gradient`; l-fa / lg-fa on LocalMixer:
`bpfree.fastpaths.localmixer_feedback`, next to the LocalMixer's feedback matrices).

Every block is trained only by its own head's loss (its input is stop-gradient); the readout is trained on the
stopped features of the last block. Heads and readout always take their exact gradients.

The "LG" objective replicates each block's loss for every (patch p, group g) (`bpfree.losses.grid`). Its
gradient, as the authors' code defines it (sum over copies, mean over the batch): at every perturbed activity
a_l of the block (post-LN, pre-ReLU of each unit) except the token-mixing one, copy (p, g) is credited only at
its own slice a_l[b, p, group g]; at the token-mixing unit of blocks >= 1 every channel of patch p is credited
by all copies of patch p (the sum over groups):

    delta a_l[b, p, group g] = (1/B) * dL_{b,p,g} / d a_l[b, p, group g]       (channel and grouped units)
    delta a_0[b, p, :]       = (1/B) * sum_g dL_{b,p,g} / d a_0[b, p, :]        (token-mixing unit)

and the weight gradient is delta a_l pushed back through that unit's LN and linear only. This is what LG-FG-A
estimates without bias and what `lg-bp` computes exactly. Every path from a channel or grouped unit to the
block output keeps patches and groups apart, and the token-mixing unit's patch p reaches only patch p of the
output, so this target is the ordinary block-local gradient: `lg-bp` equals `l-bp`, and the grid changes only
the forward-gradient estimates (their variance). See docs/localmixer.md (also for the group-diagonal target at the
token-mixing unit that this project used before, and its measurement).

Forward gradients (lg-fg-a, lg-fg-w) are computed for real in forward mode (hand-written tangent propagation
through the block, see `_tangent_pass`), never derived from a backward pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core import tangents as T
from bpfree.core.errors import UsageError
from bpfree.core.group import Group
from bpfree.losses import LossGrid, augment, local_loss_grid, nt_xent
from bpfree.methods import forward_gradient as FG
from bpfree.methods import register_fast_path
from bpfree.methods.base import Estimator, StepResult, output_error, rank_seed
from bpfree.models.localmixer import (
    LNCache,
    LocalMixer,
    MixerBlock,
    Unit,
    layer_norm_cached,
    unit_params,
    unit_weight_grads,
)

# ---------------------------------------------------------------------------------------------------------------
# Forward-mode machinery on a traced block


def _linear_tangent(block: MixerBlock, kind: str, t_dot: torch.Tensor) -> torch.Tensor:
    """The unit's linear map (no bias) applied to a tangent [..., B, P, in]."""
    if kind == "token":
        assert block.token_mix is not None
        return torch.matmul(block.token_mix.weight, t_dot)
    if kind == "channel":
        return t_dot @ block.channel.weight.T
    return torch.einsum("...gi,goi->...go", t_dot.unflatten(-1, (block.groups, -1)), block.group_weight).flatten(-2)


def _tangent_pass(
    block: MixerBlock,
    units: list[Unit],
    activity_noise: list[torch.Tensor] | None = None,
    weight_noise: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    x_dot: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward-mode derivative of the block output [K, B, P, C] along K tangents.

    activity_noise[l] [K, B, P, C] is noise u added to unit l's post-LN activity (FG-A), given already multiplied
    by the unit's ReLU derivative (the only way it enters); weight_noise[l] = (dW [K, ...],
    db [K, ...]) perturbs unit l's parameters (FG-W). x_dot [K, B, P, C_in] is the tangent of the block input
    (end-to-end forward gradients); None for a stop-gradient input (local losses).
    Hand-written (linear maps, LN and ReLU Jacobians) because every piece is already cached by `trace`.
    """
    t_dot: torch.Tensor | None = None
    if x_dot is not None:
        assert units[0].pre is not None
        t_dot = units[0].pre.apply(x_dot)
    residual = x_dot is not None and block.token_mix is not None  # out = ReLU(a + x): x's tangent joins there
    h_dot = torch.zeros(())
    for i, unit in enumerate(units):
        s_dot = None if t_dot is None else _linear_tangent(block, unit.kind, t_dot)
        if weight_noise is not None:
            dw, db = weight_noise[i]
            if unit.kind == "token":
                extra = torch.matmul(dw[:, None], unit.inp) + db[:, None, :, None]
            elif unit.kind == "channel":
                extra = torch.einsum("bpi,koi->kbpo", unit.inp, dw) + db[:, None, None, :]
            else:
                gi = unit.inp.unflatten(-1, (block.groups, -1))
                extra = torch.einsum("bpgi,kgoi->kbpgo", gi, dw).flatten(-2) + db[:, None, None, :]
            s_dot = extra if s_dot is None else s_dot + extra
        if activity_noise is None:
            assert s_dot is not None
            h_dot = unit.ln.apply(s_dot) * unit.live
        elif s_dot is None:
            h_dot = activity_noise[i]
        else:  # (LN'(s) s_dot + u) * relu' with u * relu' precomputed: one fused pass
            h_dot = torch.addcmul(activity_noise[i], unit.ln.apply(s_dot), unit.live)
        if residual and unit.nxt is None:
            assert x_dot is not None
            h_dot = torch.addcmul(h_dot, x_dot, unit.live)
        if unit.nxt is not None:
            t_dot = unit.nxt.apply(h_dot)
    return h_dot


# ---------------------------------------------------------------------------------------------------------------
# Estimators


def two_views(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The contrastive objective's batch: two random crops + flips of every image, stacked (rows i and i+N pair)."""
    pad = max(1, x.shape[-1] // 8)  # 4 px on 32-px CIFAR (the usual crop); a 4-px shift would wreck 8-px digits
    return torch.cat([augment(x, generator, pad), augment(x, generator, pad)]), torch.cat([y, y])


def readout_step(
    model: LocalMixer, h: torch.Tensor, y: torch.Tensor, two_view: bool, extra: dict[str, float] | None = None
) -> StepResult:
    """Exact gradient of the readout (a linear probe under the contrastive objective) on the stopped features h."""
    feats = model.pooled(h.detach())
    with torch.enable_grad():
        logits = model.classify(feats)
        loss = F.cross_entropy(logits, y)
        gw, gb = torch.autograd.grad(loss, [model.readout.weight, model.readout.bias])
    model.readout.weight.grad, model.readout.bias.grad = gw, gb
    n = logits.shape[0] // 2 if two_view else logits.shape[0]  # report the first view's predictions
    return StepResult(loss.detach(), logits[:n].detach(), extra or {})


def contrastive_backprop_step(
    model: LocalMixer, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, temperature: float
) -> StepResult:
    """End-to-end backprop of a contrastive loss: the BP row of the paper's Table 4.

    Plain SimCLR (no stop-gradient: BP does not need it) on the last block's projection head, backpropagated through
    every block; the readout is a linear probe on the stopped features. The other local heads get zero gradients.
    """
    x, y = two_views(x, y, generator)
    last = len(model.blocks) - 1
    trunk = [p for name, p in model.named_parameters() if not name.startswith(("heads.", "readout."))]
    head = [model.heads[last].weight, model.heads[last].bias]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with torch.enable_grad():
        h = model.features(x)[-1]
        loss = nt_xent(model.head(last, model.head_input(h)), temperature, stop_gradient=False).mean()
        grads = torch.autograd.grad(loss, trunk + head, allow_unused=True)
    for p, g in zip(trunk + head, grads):
        if g is not None:
            p.grad = g
    return readout_step(model, h, y, True, {"contrastive_loss": float(loss.detach())})


class LocalEstimator(Estimator):
    """Shared step: views, per-block local training (subclass hook), exact head and readout gradients."""

    grid = False  # whether the block loss is the patch x group grid

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        if not isinstance(model, LocalMixer):
            raise UsageError(f"this method needs a localmixer-* model, got {type(model).__name__}")
        self.objective = self.options["objective"]
        self.temperature = self.options["temperature"]
        if self.objective == "contrastive" and model.head_dim == model.num_classes:
            raise UsageError("--objective contrastive needs projection heads: build the model with --head-dim 128")
        self.head_lr_mult = self.options["head_lr_mult"]
        self.readout_lr_mult = self.options["readout_lr_mult"]
        groups = self.options.get("groups", 0)  # lg-* only
        if groups and groups != model.groups:
            raise UsageError(f"localmixer: the loss grid's groups are the model's --groups ({model.groups})")

    def lr_multipliers(self) -> list[tuple[list[nn.Parameter], float]]:
        model = self.model
        assert isinstance(model, LocalMixer)
        return [(list(model.heads.parameters()), self.head_lr_mult),
                (list(model.readout.parameters()), self.readout_lr_mult)]

    def head(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        """Local head i's linear on its input features (feedback alignment swaps its backward)."""
        return self.model.head(i, feats)  # type: ignore[operator]

    # -- local loss of block i on the head's input features (`LocalMixer.head_input`): per-example losses
    def local_loss_fn(self, i: int, y: torch.Tensor):  # noqa: ANN201 - returns a closure
        if self.objective == "contrastive":
            return lambda feats: nt_xent(self.head(i, feats), self.temperature)
        return lambda feats: F.cross_entropy(self.head(i, feats), y, reduction="none")

    def loss_grid(self, i: int, out: torch.Tensor, y: torch.Tensor) -> LossGrid:
        """Block i's patch x group loss grid on its output `out`."""
        model = self.model
        assert isinstance(model, LocalMixer)
        return local_loss_grid(out, model.blocks[i].groups, self.local_loss_fn(i, y), model.head_input)

    def train_block(self, i: int, block: MixerBlock, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Set the grads of block i and its head from input x (stop-gradient); return (output, local loss)."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        model = self.model
        assert isinstance(model, LocalMixer)
        if self.objective == "contrastive":
            x, y = two_views(x, y, self.generator)
        h = model.tokens(x)
        extra = {}
        for i, block in enumerate(model.blocks):
            h, loss_i = self.train_block(i, block, h.detach(), y)
            extra[f"local_loss_{i}"] = loss_i
        return readout_step(model, h, y, self.objective == "contrastive", extra)

    def _head_params(self, i: int) -> list[nn.Parameter]:
        model = self.model
        assert isinstance(model, LocalMixer)
        return [model.heads[i].weight, model.heads[i].bias]

    def _set(self, params: list[nn.Parameter], grads: list[torch.Tensor | None]) -> None:
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()


class LocalBP(LocalEstimator):
    def train_block(self, i: int, block: MixerBlock, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        params = list(block.parameters()) + self._head_params(i)
        with torch.enable_grad():
            out = self.block_forward(i, block, x)
            per = self.local_loss_fn(i, y)(self.model.head_input(out))  # type: ignore[operator]
            loss = per.mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        self._set(params, list(grads))
        return out.detach(), float(loss.detach())

    def block_forward(self, i: int, block: MixerBlock, x: torch.Tensor) -> torch.Tensor:
        """Block i's forward whose autograd backward is the rule's (feedback alignment swaps the linears')."""
        return block(x)


@register_fast_path("lg-bp", LocalMixer)
class LocalGroupBP(LocalBP):
    """The grid's summed gradient at the block output equals the ordinary loss's (each copy reaches only its own
    slot, with the ordinary slope there), and inside the block the LG target is the ordinary backward (module
    docstring): this is l-bp's gradient, computed through the grid."""

    def train_block(self, i: int, block: MixerBlock, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        params = list(block.parameters())
        with torch.enable_grad():
            out = self.block_forward(i, block, x)
            grid = self.loss_grid(i, out, y)
            values = grid.values(out)  # [B, P, G]
            loss = grid.per_example.mean()
            # sum over copies, mean over the batch (the scale of the ordinary local loss at the block output)
            block_grads = torch.autograd.grad(values.sum((1, 2)).mean(), params, retain_graph=True, allow_unused=True)
            head_grads = torch.autograd.grad(loss, self._head_params(i))
        self._set(params, list(block_grads))
        self._set(self._head_params(i), list(head_grads))
        return out.detach(), float(loss.detach())


class LocalForwardGradient(LocalEstimator):
    """Shared part of lg-fg-a / lg-fg-w: trace, exact head gradients, the grid's directional derivatives."""


    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        o = self.options
        self.tangents, self.aggregation, self.dist = o["tangents"], o["aggregation"], o["tangent_dist"]

    def head_step(self, i: int, out: torch.Tensor, y: torch.Tensor) -> tuple[LossGrid, float]:
        grid = self.loss_grid(i, out, y)
        with torch.enable_grad():
            loss = grid.per_example.mean()
            self._set(self._head_params(i), list(torch.autograd.grad(loss, self._head_params(i))))
        return grid, float(loss.detach())

    def sample(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return T.sample(shape, self.dist, self.generator, device=like.device, dtype=like.dtype)


@register_fast_path("lg-fg-a", LocalMixer)
class LocalFGActivity(LocalForwardGradient):
    """Noise u (Rademacher by default, or N(0, I); independent per example, token and unit) on every unit's
    post-LN pre-ReLU activity, one forward-mode pass per block; copy (p, g)'s directional derivative d[b,p,g]
    scales u's slice [b, p, group g] at every unit (all units of a block share it), except at the token-mixing
    unit, where the sum over groups sum_g d[b,p,g] scales all of u[b, p, :] (as the authors' code); the
    estimate is masked by the ReLU derivative and passed back through that unit's LN and linear only."""

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        self._scratch = torch.Generator(device=self.generator.device)

    def block_stream(self) -> torch.Generator:
        """The generator for one block's activity tangents, seeded afresh from the shared generator.

        Data-parallel ranks must draw independent per-example tangents (rank r's example i must not reuse rank 0's
        tangents), so rank r offsets the seed; every rank still advances the shared generator alike, so a resumed
        run replays the same tangents on every rank.
        """
        return self._scratch.manual_seed(rank_seed(self.draw_seed(), self.group.rank))

    def train_block(self, i: int, block: MixerBlock, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        out, units = block.trace(x)
        grid, loss = self.head_step(i, out, y)
        k = self.tangents
        stream = self.block_stream()
        noise = [T.sample((k, *u.live.shape), self.dist, stream, device=u.live.device, dtype=u.live.dtype)
                 for u in units]
        with torch.no_grad():
            masked = [u.mul_(unit.live) for u, unit in zip(noise, units)]
            # Orthogonal: the Gram matrix of the masked tangents, the ones the directional derivatives see
            gram = T.gram(masked, True, T.entries(self.dist, masked=True)) if self.aggregation == "orthogonal" else None
            dim = T.dimension(masked, per_example=True)
            d = grid.directional(_tangent_pass(block, units, activity_noise=masked))  # [K, B, P, G]
            d = d / x.shape[0]  # objective: mean over the batch of the sum over copies
            c = T.coefficients(d, self.aggregation, gram, dim).unsqueeze(-1)  # [K, B, P, G, 1]
            # every channel of patch p at the token-mixing unit takes all copies of patch p
            c_token = c.sum(-2, keepdim=True)  # [K, B, P, 1, 1]
            for unit, u in zip(units, masked):
                cu = c_token if unit.kind == "token" else c
                ug = u.unflatten(-1, (cu.shape[-2], -1))  # masked by the ReLU derivative, as the estimate should be
                est = (cu[0] * ug[0] if k == 1 else (cu * ug).sum(0)).flatten(-2)
                dw, db = unit_weight_grads(block, unit, est)
                w, b = unit_params(block, unit.kind)
                w.grad, b.grad = dw, db
        return out, loss


@register_fast_path("lg-fg-w", LocalMixer)
class LocalFGWeight(LocalForwardGradient):
    """Weight tangents v (shared by the batch); copy (p, g)'s directional derivative scales the slice of v it
    owns: rows of group g for channel and grouped linears, row p of the token-mixing linear."""

    def all_reduce_gradients(self, group: Group, weight: float) -> None:
        """Data-parallel: the blocks' updates are already equal on every rank (see train_block); only the heads' and
        the readout's exact gradients, computed from local examples, are left to average."""
        model = self.model
        assert isinstance(model, LocalMixer)
        params = [p for i in range(len(model.blocks)) for p in self._head_params(i)]
        group.weighted_mean_([p.grad for p in [*params, model.readout.weight, model.readout.bias]], weight)

    def train_block(self, i: int, block: MixerBlock, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        out, units = block.trace(x)
        grid, loss = self.head_step(i, out, y)
        k, g = self.tangents, block.groups
        noise = []
        for unit in units:
            w, b = unit_params(block, unit.kind)
            noise.append((self.sample((k, *w.shape), w), self.sample((k, *b.shape), b)))
        with torch.no_grad():
            d = grid.directional(_tangent_pass(block, units, weight_noise=noise)) / x.shape[0]  # [K, B, P, G]
            # Every use below sums d over the batch, so only that sum matters. Data-parallel ranks draw the same
            # (seed-shared) tangents, so averaging these K*P*G numbers is all they exchange for the block.
            d = d.sum(1, keepdim=True)
            self.group.weighted_mean_([d], x.shape[0])
            flat = [t for pair in noise for t in pair]
            gram = T.gram(flat, entries=T.entries(self.dist)) if self.aggregation == "orthogonal" else None
            c = T.coefficients(d, self.aggregation, gram, T.dimension(flat))
            for unit, (dw, db) in zip(units, noise):
                w, b = unit_params(block, unit.kind)
                if unit.kind == "token":
                    coef = c.sum((1, 3))  # [K, P]: row p belongs to the copies of patch p
                    w.grad = torch.einsum("kp,kpq->pq", coef, dw)
                    b.grad = (coef * db).sum(0)
                else:
                    coef = c.sum((1, 2))  # [K, G]: group g's rows belong to the copies of group g
                    if unit.kind == "channel":
                        w.grad = (coef.repeat_interleave(w.shape[0] // g, dim=1)[..., None] * dw).sum(0)
                    else:
                        w.grad = torch.einsum("kg,kgoi->goi", coef, dw)
                    b.grad = (coef.repeat_interleave(b.shape[0] // g, dim=1) * db).sum(0)
        return out, loss


# ---------------------------------------------------------------------------------------------------------------
# Global (end-to-end) forward gradients on LocalMixer: the paper's FG-W and FG-A baselines


def _mixer_trace(
    model: LocalMixer, x: torch.Tensor
) -> tuple[list[list[Unit]], torch.Tensor, LNCache, torch.Tensor]:
    """Primal pass through every block (no stop-gradient) and the readout: (units per block, readout LN output z,
    its cache, logits)."""
    h = model.tokens(x)
    traces = []
    for block in model.blocks:
        h, units = block.trace(h)
        traces.append(units)
    z, ln = layer_norm_cached(model.pooled(h))
    return traces, z, ln, F.linear(z, model.readout.weight, model.readout.bias)


def _logits_tangent(model: LocalMixer, ln: LNCache, h_dot: torch.Tensor) -> torch.Tensor:
    """Tangent of the logits [K, B, classes] from the last block output's tangent [K, B, P, C]."""
    return ln.apply(model.pooled(h_dot)) @ model.readout.weight.T


def _set_readout(model: LocalMixer, z: torch.Tensor, grad_logits: torch.Tensor) -> None:
    """The readout's gradient from a (true or estimated) gradient at the logits and its own input z."""
    model.readout.weight.grad = grad_logits.T @ z
    model.readout.bias.grad = grad_logits.sum(0)


def mixer_fg_a(est: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fg-a` on LocalMixer, as in the paper's code: trained end to end on the readout's loss.

    Noise u (independent per example, token and unit; K tangents) on every unit's post-LN, pre-ReLU activity
    in every block at once; the tangents travel forward through ALL blocks (no stop-gradient) and the readout,
    giving one directional derivative d[k, b] of the global loss per example, shared by all units. Each unit's
    activity gradient is estimated as sum_k c[k, b] u (masked by the ReLU derivative: a known zero) and pushed
    back through that unit's LN and linear only. Since a unit's parameters reach the loss only through its
    activity, this is unbiased for the ordinary end-to-end gradient. The local heads take no part (zero
    gradient); the readout takes its exact gradient (or is perturbed too with --exact-readout false).
    `--recompute` is refused on this path: every unit's tangents are kept until d is known.
    """
    model = est.model
    assert isinstance(model, LocalMixer)
    k = est.K
    traces, z, ln, logits = _mixer_trace(model, x)
    loss, e = output_error(est, logits, y)
    noise = [[est._sample_(torch.empty((k, *u.live.shape), device=x.device, dtype=u.live.dtype)).mul_(u.live)
              for u in units] for units in traces]
    flat = [u for us in noise for u in us]
    h_dot = None
    for block, units, us in zip(model.blocks, traces, noise):
        h_dot = _tangent_pass(block, units, activity_noise=us, x_dot=h_dot)
    assert h_dot is not None
    logits_dot = _logits_tangent(model, ln, h_dot)
    u_out = None
    if not est.exact_readout:
        u_out = est._sample_(torch.empty((k, *logits.shape), device=x.device, dtype=logits.dtype))
        logits_dot = logits_dot + u_out
        flat.append(u_out)
    d = (logits_dot * e).sum(-1)  # [K, B]: per-example directional derivatives of the mean loss
    # Orthogonal: project onto the span of the masked tangents (d only sees them), as the chain path does.
    gram = T.gram(flat, True, T.entries(est.dist, masked=True)) if est.aggregation == "orthogonal" else None
    c = T.coefficients(d, est.aggregation, gram, T.dimension(flat, per_example=True))
    for block, units, us in zip(model.blocks, traces, noise):
        for unit, u in zip(units, us):
            grad_a = T.combine(u, c)[0]
            w, b = unit_params(block, unit.kind)
            w.grad, b.grad = unit_weight_grads(block, unit, grad_a)
    _set_readout(model, z, e if u_out is None else T.combine(u_out, c)[0])
    return loss, logits


def mixer_fg_w(est: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fg-w` on LocalMixer, end to end: K weight tangents over every block's parameters (shared by the batch),
    propagated forward through all blocks and the readout by the same hand-written tangent pass; the estimate is
    sum_k c_k v_k with c from the K directional derivatives of the mean loss. The heads take no part (zero
    gradient); the readout takes its exact gradient (or is perturbed too with --exact-readout false)."""
    model = est.model
    assert isinstance(model, LocalMixer)
    k = est.K
    traces, z, ln, logits = _mixer_trace(model, x)
    loss, e = output_error(est, logits, y)
    noise = []
    h_dot = None
    for block, units in zip(model.blocks, traces):
        pairs = []
        for unit in units:
            w, b = unit_params(block, unit.kind)
            pairs.append(tuple(est._sample_(torch.empty((k, *p.shape), device=p.device, dtype=p.dtype))
                               for p in (w, b)))
        noise.append(pairs)
        h_dot = _tangent_pass(block, units, weight_noise=pairs, x_dot=h_dot)
    assert h_dot is not None
    logits_dot = _logits_tangent(model, ln, h_dot)
    flat = [v for pairs in noise for pair in pairs for v in pair]
    if not est.exact_readout:
        vw, vb = (est._sample_(torch.empty((k, *p.shape), device=p.device, dtype=p.dtype))
                  for p in (model.readout.weight, model.readout.bias))
        logits_dot = logits_dot + z @ vw.transpose(-1, -2) + vb[:, None, :]
        flat += [vw, vb]
    d = (logits_dot * e).sum((-1, -2))  # [K]
    est.group.weighted_mean_([d], x.shape[0])  # data-parallel: seed-shared tangents, K numbers exchanged
    gram = T.gram(flat, entries=T.entries(est.dist)) if est.aggregation == "orthogonal" else None
    c = T.coefficients(d, est.aggregation, gram, T.dimension(flat))
    for block, units, pairs in zip(model.blocks, traces, noise):
        for unit, pair in zip(units, pairs):
            for p, g in zip(unit_params(block, unit.kind), T.combine(list(pair), c)):
                p.grad = g
    if est.exact_readout:
        _set_readout(model, z, e)
    else:
        model.readout.weight.grad, model.readout.bias.grad = T.combine([vw, vb], c)
    return loss, logits


# ---------------------------------------------------------------------------------------------------------------
# Registration: every rule above is LocalMixer's fast path for the generic method of the same name.

register_fast_path("l-bp", LocalMixer)(LocalBP)


@register_fast_path("fg-a", LocalMixer, refuses=("recompute",))
class MixerFGActivity(FG.ForwardGradientActivity):
    """`fg-a` on LocalMixer: `mixer_fg_a` in place of the generic forward-mode path."""

    acts_on_layer_calls = False  # LocalMixer's functional token mixing is written out here

    def _step_generic(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mixer_fg_a(self, x, y)


@register_fast_path("fg-w", LocalMixer)
class MixerFGWeight(FG.ForwardGradientWeight):
    """`fg-w` on LocalMixer: `mixer_fg_w` in place of the generic forward-mode path."""

    def _step_generic(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mixer_fg_w(self, x, y)
