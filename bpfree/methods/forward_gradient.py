"""Forward gradients (Ren et al. 2022; Flügel et al. 2024): gradient estimates from forward-mode passes only.

fg-w  weight perturbation: K tangents V over all weights; one forward-mode pass gives d_k = grad(L) . v_k;
      the estimate is sum_k c_k v_k (c from the aggregation, see bpfree.core.tangents).
fg-a  activity perturbation: K tangents u on the pre-activations of every layer, independent per example;
      d_{k,n} = per-example directional derivative; each layer's pre-activation gradient is estimated as
      sum_k c_{k,n} u_{k,n}, masked where the activation's derivative is zero (a known zero, so the mask keeps
      the estimate unbiased and lowers its variance); the weight gradient is formed locally from that layer's
      own input. `orthogonal` projects per example onto the span of that example's masked tangents.

No backward pass runs through a network layer: the only autograd calls are through the loss function alone
(dL/dlogits, to turn the output tangent into d) and, on the generic path, one-module vector-Jacobian products
that turn an estimated pre-activation gradient into that module's parameter gradient.

Execution paths:
* fast path for nn.Sequential chains [Flatten] Linear, activation, ..., Linear (the `mlp`): primal and
  the K tangents share one buffer [K+1, B, width], so a layer is ONE matmul for all of them, and ReLU is one
  multiply by the primal's mask for primal and tangents together. fg-w: a layer's weight tangents enter as
  x V_k^T, one batched matmul written straight into the tangent rows; with K = 1 the tangent is drawn into
  p.grad and scaled at the end (no memory beyond the gradients); with K > 1 the K tangents of every parameter
  are kept in buffers reused from step to step (K x the parameters' memory), so the estimate sum_k c_k v_k is
  one [K] x [K, numel] product and the Gram matrix (orthogonal) is accumulated layer by layer. fg-a: activity
  tangents are stored, or with recompute=True regenerated from the per-step seed, so that nothing waits in
  memory for the output's directional derivative: activation memory is flat in depth.
* generic path for any other model of Linear/Conv/pooling/activations: fg-w with one tangent, one
  torch.autograd.forward_ad pass with dual weights (`tangent_friendly` convolutions and batch norms); with K
  tangents, torch.func.jvp over the parameters with the K tangents vmapped. fg-a: torch.autograd.forward_ad
  with tangents injected at the output of every parametrised module and the batch replicated K times. Correct
  but slower; fg-a keeps layer inputs.

* model-specific fast paths (`bpfree.methods.register_fast_path`) subclass these estimators and override
  `_step_generic`: LocalMixer's (`bpfree.fastpaths.localmixer_local`) perturbs every unit's post-LN, pre-ReLU
  activity (the paper's FG-A) with hand-written tangent propagation through all blocks.

Readout: by default (exact_readout=True, as in the paper's code) the final Linear is trained on its exact
local gradient dL/dlogits x its input (it sees only its own input, so this is no backpropagation) and is not
perturbed. exact_readout=False perturbs it like every other layer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as fwad
from torch.func import functional_call, jvp, vmap

from bpfree.core import tangents as T
from bpfree.core.attention import math_attention, patched_attention, projection_weights
from bpfree.core.errors import UsageError
from bpfree.core.forward_mode import layer_param_grads, tangent_friendly
from bpfree.core.group import Group
from bpfree.core.registry import Option
from bpfree.methods import METHODS
from bpfree.methods.base import (
    RECOMPUTE,
    Estimator,
    Replay,
    StepResult,
    output_error,
    rng_as,
    rng_state,
    set_grad,
    zero_missing_grads,
)

_COMMON = {
    "tangents": Option(1, "number of tangents K per step (all K travel through the network together)", minimum=1),
    "aggregation": Option(
        "mean",
        "combine the K directional derivatives: sum, mean, orthogonal (projection)",
        choices=T.AGGREGATIONS,
    ),
    "tangent_dist": Option(
        "rademacher",
        "tangent entries: rademacher (+-1; 11x cheaper to draw on CPU) or normal",
        choices=T.DISTS,
    ),
    "exact_readout": Option(True, "train the final Linear on its exact local gradient (not perturbed)"),
}

# Elementwise activations the fast path handles (their derivative comes from one jvp with a ones tangent).
_ACTIVATIONS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
    nn.Identity,
)

Chain = list[tuple[nn.Linear, "nn.Module | None"]]

def _chain(model: nn.Module) -> Chain | None:
    """(Linear, activation-or-None) pairs if `model` is a [Flatten] Linear/activation chain, else None."""
    if not isinstance(model, nn.Sequential):
        return None
    mods = list(model)
    if mods and isinstance(mods[0], nn.Flatten):
        mods = mods[1:]
    pairs: Chain = []
    for m in mods:
        if isinstance(m, nn.Linear):
            pairs.append((m, None))
        elif isinstance(m, _ACTIVATIONS) and pairs and pairs[-1][1] is None:
            pairs[-1] = (pairs[-1][0], m)
        else:
            return None
    if not pairs or pairs[-1][1] is not None:
        return None
    return pairs


def _activate_(Z: torch.Tensor, act: nn.Module | None) -> torch.Tensor | None:
    """Apply `act` in place to the primal Z[0] and its derivative to the tangents Z[1:] ([K+1, B, n]).

    Returns the mask of coordinates where the derivative is nonzero (None: nonzero everywhere).
    """
    if act is None or isinstance(act, nn.Identity):
        return None
    if isinstance(act, nn.ReLU):
        mask = Z[0] > 0
        Z.mul_(mask)  # relu(z) = z * [z > 0] for the primal; the same mask is the tangents' Jacobian
        return mask
    h, deriv = jvp(act, (Z[0],), (torch.ones_like(Z[0]),))  # elementwise: jvp with ones = derivative
    Z[1:].mul_(deriv)
    Z[0].copy_(h)
    return deriv != 0


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Identical values; NaN equals NaN (a diverged run is the trainer's to report, not a readout mismatch)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


class _ForwardGradient(Estimator):
    """Shared option handling, per-step tangent seeds, and the exact readout."""


    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        o = self.options
        self.K, self.aggregation, self.dist = o["tangents"], o["aggregation"], o["tangent_dist"]
        self.exact_readout = o["exact_readout"]
        self.chain = _chain(model)
        # Tangents come from a scratch generator seeded per step from self.generator: they can be regenerated
        # (same seed, same order) instead of stored, and a restored self.generator replays the same sequence.
        self._scratch = torch.Generator(device=self.generator.device)

    def _new_step(self) -> int:
        seed = self.draw_seed()
        self._scratch.manual_seed(seed)
        return seed

    def _sample_(self, out: torch.Tensor, copies: int = 0) -> torch.Tensor:
        """Tangents drawn into `out` from the step's stream. Per-example tangents (`copies` > 0: `out` holds that many
        stacked copies of the batch) are, in a data-parallel run, this rank's rows of the global batch's."""
        if copies:
            return self.sample_rows_(lambda t: T.sample_(t, self.dist, self._scratch), out, copies)
        return T.sample_(out, self.dist, self._scratch)

    def _perturbed(self, i: int) -> bool:
        """Whether chain layer i gets tangents (the readout does not when trained on its exact gradient)."""
        return not (self.exact_readout and i == len(self.chain) - 1)

    def _readout_grads(self, lin: nn.Linear, h_in: torch.Tensor, e: torch.Tensor) -> None:
        set_grad(lin.weight, e.T @ h_in)
        if lin.bias is not None:
            set_grad(lin.bias, e.sum(0))

    def _readout_module(self) -> nn.Linear | None:
        """The last Linear (generic path); it must produce the logits, checked at run time."""
        if not self.exact_readout:
            return None
        last = None
        for m in self.model.modules():
            if isinstance(m, nn.Linear):
                last = m
        if last is None:
            raise UsageError("exact_readout needs a final nn.Linear; pass --exact-readout false")
        return last

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        for p in self.trainable():
            p.grad = None
        seed = self._new_step()
        with torch.no_grad():
            if self.chain is not None:
                loss, logits = self._step_chain(x, y, seed)
            else:
                loss, logits = self._step_generic(x, y)
        zero_missing_grads(self.trainable())
        return StepResult(loss, logits)

    def _step_chain(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _step_generic(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@METHODS.register(
    "fg-w",
    "forward gradient, weight perturbation: K weight-space tangents, d = grad.v by forward mode",
    options=dict(_COMMON),
    paper="Ren et al. 2022 (arXiv 2210.03310); Flügel et al. 2024 (arXiv 2410.17764)",
)
class ForwardGradientWeight(_ForwardGradient):
    method = "fg-w"

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        self._tangent_buffers: dict[int, torch.Tensor] = {}  # fast path, K > 1: id(parameter) -> [K, *shape]

    def all_reduce_gradients(self, group: Group, weight: float) -> None:
        """Data-parallel: seed-shared tangents. Every rank draws the same tangents (self.generator is seeded alike
        on every rank), so averaging the K directional derivatives inside `step` (weighted by the ranks' batch
        shares: d is linear in the mean loss) already gave every rank the same estimate, with O(K) bytes instead of
        O(parameters). Only the exact readout's gradient, computed from local examples, is left to average."""
        readout = self._readout_module()
        if readout is not None:
            group.weighted_mean_([p.grad for p in readout.parameters() if p.requires_grad], weight)

    def _step_chain(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        K, chain = self.K, self.chain
        h = x.reshape(x.shape[0], -1)
        B = h.shape[0]
        orth = self.aggregation == "orthogonal"
        G = torch.zeros(K, K, dtype=torch.float64, device=x.device) if orth else None
        dim = 0
        # K == 1: each tangent is drawn straight into p.grad and scaled at the end (one draw, no extra memory).
        # K > 1: drawn once into a buffer per parameter, kept between steps (a fresh buffer of this size costs its
        # page faults again every step); the estimate sum_k c_k v_k is then one [K] x [K, numel] product per
        # parameter (drawing the tangents a second time would cost more than reading them back).
        direct = K == 1
        drawn: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its K tangents)

        def tangent(p: torch.Tensor) -> torch.Tensor:
            nonlocal dim
            if direct:
                p.grad = torch.empty_like(p)
                v = self._sample_(p.grad.unsqueeze(0))
            else:
                buf = self._tangent_buffers.get(id(p))
                if buf is None or buf.shape != (K, *p.shape) or buf.dtype != p.dtype or buf.device != p.device:
                    buf = self._tangent_buffers[id(p)] = torch.empty((K, *p.shape), device=p.device, dtype=p.dtype)
                v = self._sample_(buf)
                drawn.append((p, v))
            if G is not None:  # accumulated layer by layer while the tangents are at hand
                G.add_(T.gram(v, entries=T.entries(self.dist)))
                dim += p.numel()
            return v

        H = h.unsqueeze(0)  # [1, B, in] until the first perturbed layer, then [K+1, B, width]
        h_last = h
        for i, (lin, act) in enumerate(chain):
            W, b = lin.weight, lin.bias
            if i == len(chain) - 1:
                h_last = H[0]
            perturb = self._perturbed(i)
            weight_tangent = perturb and W.requires_grad
            if perturb and H.shape[0] == 1:  # first perturbed layer: the tangent rows start at x V^T (or zero)
                Z = H.new_empty(K + 1, B, W.shape[0])
                torch.mm(H[0], W.T, out=Z[0])
                if not weight_tangent:
                    Z[1:].zero_()
            else:
                Z = F.linear(H, W)  # primal and all tangents through W: one matmul
            if b is not None:
                Z[0].add_(b)
            if weight_tangent:
                vW = tangent(W)  # [K, out, in]
                # x V_k^T for every k, written or accumulated straight into the tangent rows: no temporary
                xv = (H[0].expand(K, B, W.shape[1]), vW.transpose(1, 2))
                if H.shape[0] == 1:
                    torch.bmm(*xv, out=Z[1:])
                else:
                    Z[1:].baddbmm_(*xv)
            if perturb and b is not None and b.requires_grad:
                Z[1:].add_(tangent(b).unsqueeze(1))
            _activate_(Z, act)
            H = Z
        logits = H[0]
        loss, e = output_error(self, logits, y)
        if H.shape[0] > 1:
            d = torch.einsum("kbc,bc->k", H[1:], e)
            self.group.weighted_mean_([d], B)  # data-parallel: the K numbers are all that ranks exchange
            c = T.coefficients(d, self.aggregation, G, dim)
            if direct:
                for i, (lin, _) in enumerate(chain):
                    if self._perturbed(i):
                        for p in (lin.weight, lin.bias):
                            if p is not None and p.requires_grad:
                                p.grad.mul_(c[0])
            for p, v in drawn:
                p.grad = (c.to(v.dtype) @ v.view(K, -1)).view(p.shape)
        if self.exact_readout:
            self._readout_grads(chain[-1][0], h_last, e)
        return loss, logits.clone()

    def _step_generic(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.K
        readout = self._readout_module()
        skip = {id(p) for p in readout.parameters()} if readout is not None else set()
        named = dict(self.model.named_parameters())
        pert = {n: p.detach() for n, p in named.items() if p.requires_grad and id(p) not in skip}
        tang = {n: self._sample_(torch.empty((K, *p.shape), device=p.device, dtype=p.dtype)) for n, p in pert.items()}
        captured: dict[str, torch.Tensor] = {}

        def grab(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            captured["in"] = fwad.unpack_dual(inp[0]).primal.detach()
            captured["out"] = fwad.unpack_dual(out).primal.detach()

        def check_readout(logits: torch.Tensor) -> None:
            if readout is not None and not _same(captured["out"], logits):
                raise UsageError(
                    "exact_readout: the model's last Linear does not produce the logits; pass --exact-readout false"
                )

        if K == 1:
            # One forward-mode pass gives the logits and their tangent: each layer's primal and tangent live only
            # until the next layer has them (convolutions and batch norms with the lean tangent rules).
            handle = readout.register_forward_hook(grab) if readout is not None else None
            try:
                with fwad.dual_level(), math_attention(), tangent_friendly(self.model):
                    duals = {n: fwad.make_dual(p, tang[n][0]) for n, p in pert.items()}
                    logits, tangent = fwad.unpack_dual(functional_call(self.model, duals, (x,), strict=False))
                    ydot = (torch.zeros_like(logits) if tangent is None else tangent).unsqueeze(0)
                    logits = logits.detach()
                    del duals, tangent
            finally:
                if handle is not None:
                    handle.remove()
            check_readout(logits)
            loss, e = output_error(self, logits, y)
        else:
            handle = readout.register_forward_hook(grab) if readout is not None else None
            try:
                logits = self.model(x)
            finally:
                if handle is not None:
                    handle.remove()
            check_readout(logits)
            loss, e = output_error(self, logits, y)

            # Batch-norm running statistics were updated by the primal pass above; inside the transform they are
            # hidden (None -> batch statistics, no in-place update of a captured tensor), as in the primal.
            stats = {
                n: None
                for n, _ in self.model.named_buffers()
                if self.model.training and n.rsplit(".", 1)[-1] in ("running_mean", "running_var",
                                                                    "num_batches_tracked")
            }

            def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return functional_call(self.model, {**p, **stats}, (x,))

            def tangent_out(t: dict[str, torch.Tensor]) -> torch.Tensor:
                return jvp(f, (pert,), (t,))[1]

            with math_attention():  # forward-mode AD has no rule for the CPU flash-attention kernel
                ydot = vmap(tangent_out, randomness="same")(tang)  # [K, B, C]: the K tangents batched, not looped
        d = torch.einsum("kbc,bc->k", ydot, e)
        self.group.weighted_mean_([d], x.shape[0])  # data-parallel: the K numbers are all that ranks exchange
        orth = self.aggregation == "orthogonal"
        G = T.gram(list(tang.values()), entries=T.entries(self.dist)) if orth else None
        c = T.coefficients(d, self.aggregation, G, sum(p.numel() for p in pert.values()))
        for n, v in tang.items():
            named[n].grad = torch.tensordot(c.to(v.dtype), v, dims=1)
        if readout is not None:
            self._readout_grads(readout, captured["in"].reshape(-1, readout.in_features), e)
        return loss, logits.detach()


@METHODS.register(
    "fg-a",
    "forward gradient, activity perturbation: per-example tangents on pre-activations, local weight grads",
    options={
        **_COMMON,
        "recompute": RECOMPUTE,
    },
    paper="Ren et al. 2022 (arXiv 2210.03310); Flügel et al. 2024 (arXiv 2410.17764)",
)
class ForwardGradientActivity(_ForwardGradient):
    method = "fg-a"
    acts_on_layer_calls = True

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        self.recompute = self.options["recompute"]

    def _local_grads(self, lin: nn.Linear, h_in: torch.Tensor, um: torch.Tensor, c: torch.Tensor) -> None:
        """Weight gradient from the pre-activation estimate sum_k c_kn um_kn and the layer's own input."""
        gz = torch.einsum("kb,kbo->bo", c.to(um.dtype), um)
        set_grad(lin.weight, gz.T @ h_in)
        if lin.bias is not None:
            set_grad(lin.bias, gz.sum(0))

    def _step_chain(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        K, chain = self.K, self.chain
        h = x.reshape(x.shape[0], -1)
        B = h.shape[0]
        orth = self.aggregation == "orthogonal"
        G = torch.zeros(B, K, K, dtype=torch.float64, device=x.device) if orth else None
        dim = 0
        saved: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []  # (layer, input, masked tangents)
        H = h.unsqueeze(0)
        h_last = h
        for i, (lin, act) in enumerate(chain):
            W, b = lin.weight, lin.bias
            if i == len(chain) - 1:
                h_last = H[0]
            perturb = self._perturbed(i)
            u = None
            if H.shape[0] == 1:  # no tangent yet: primal matmul only, the tangents are just u
                Z = torch.empty(K + 1 if perturb else 1, B, W.shape[0], device=h.device, dtype=h.dtype)
                torch.matmul(H[0], W.T, out=Z[0])
                if perturb:
                    u = self._sample_(Z[1:], copies=K)
            else:
                Z = F.linear(H, W)  # primal and all K tangents: one matmul
                if perturb:
                    u = self._sample_(torch.empty_like(Z[1:]), copies=K)
                    Z[1:].add_(u)
            if b is not None:
                Z[0].add_(b)
            if u is not None and u.data_ptr() == Z[1:].data_ptr():
                mask = _activate_(Z, act)
                um = Z[1:]  # first perturbed layer: the masked tangent is the tangent buffer itself
                if not self.recompute:
                    um = um.clone()
            else:
                mask = _activate_(Z, act)
                um = None if u is None else (u if mask is None else u.mul_(mask))
            if um is not None:
                if orth:
                    G += T.gram(um, True, T.entries(self.dist, masked=True))
                    dim += um.shape[-1]
                if not self.recompute:
                    saved.append((lin, H[0].clone() if H.shape[0] > 1 else H[0], um))
            H = Z
        logits = H[0]
        loss, e = output_error(self, logits, y)
        if H.shape[0] > 1:
            d = torch.einsum("kbc,bc->kb", H[1:], e)  # per-example directional derivatives
            c = T.coefficients(d, self.aggregation, G, dim)
            if self.recompute:
                self._recompute_grads(h, c)
            else:
                for lin, h_in, um in saved:
                    self._local_grads(lin, h_in, um, c)
        if self.exact_readout:
            self._readout_grads(chain[-1][0], h_last, e)
        return loss, logits.clone()

    def _recompute_grads(self, h: torch.Tensor, c: torch.Tensor) -> None:
        """Second primal pass: regenerate each layer's tangents from the seed, form its gradient, drop it."""
        self._scratch.manual_seed(self._seed)
        K, B = self.K, h.shape[0]
        for i, (lin, act) in enumerate(self.chain):
            if not self._perturbed(i):
                break
            Z = F.linear(h, lin.weight, lin.bias).unsqueeze(0)
            mask = _activate_(Z, act)
            u = self._sample_(torch.empty(K, B, Z.shape[-1], device=h.device, dtype=h.dtype), copies=K)
            self._local_grads(lin, h, u if mask is None else u.mul_(mask), c)
            h = Z[0]

    def _new_step(self) -> int:
        # Data-parallel: every rank seeds the stream alike and keeps its rows of the global batch's tangents
        # (`_sample_`), so each example gets the tangents one process would give it.
        self._seed = super()._new_step()
        return self._seed

    def _step_generic(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_batch_norm()
        readout = self._readout_module()
        mods, loose = self._perturbed_maps()
        replay = Replay(self.model, x.device) if self.recompute else None
        records: list[_Record] = []
        orth = self.aggregation == "orthogonal"
        gram: list[Any] = [None, 0]  # orthogonal aggregation: the tangents' Gram matrix and dimension, summed
        kind = T.entries(self.dist, masked=True)  # no mask on this path, but "integer" covers +-1 too

        def keep(rec: _Record) -> None:
            if orth:
                g = T.gram(rec.u, True, kind)
                gram[0] = g if gram[0] is None else gram[0] + g
                gram[1] += T.dimension(rec.u, per_example=True)
            if not self.recompute:
                # Keep the generator state u was drawn from, not u: `_map_grads` draws it again, bit for bit, so
                # each map holds its input only (about bp's one activation per layer, not two).
                records.append(replace(rec, u=None))

        logits, ydot, readout_io = self._activity_pass(x, mods, loose, readout, keep, dual=True)
        if readout is not None and not _same(readout_io.get("out", logits[:0]), logits):
            raise UsageError(
                "exact_readout: the model's last Linear does not produce the logits; pass --exact-readout false"
            )
        loss, e = output_error(self, logits, y)
        d = self.directional_derivatives(ydot, e.reshape(x.shape[0], -1))
        c = T.coefficients(d, self.aggregation, gram[0], gram[1] or 1)
        if replay is not None:
            # Second primal pass, same randomness and buffers: each map's input and tangents come back, its
            # gradient is formed and both are dropped (activation memory: one map's, flat in depth).
            with replay.again():
                self._scratch.manual_seed(self._seed)
                self._perturbed_maps()  # the loose tangents again: the stream stays aligned
                self._activity_pass(x, mods, {}, readout, lambda rec: self._map_grads(rec, c), dual=False)
        for rec in records:
            self._map_grads(rec, c)
        named = dict(self.model.named_parameters())
        for n, v in loose.items():
            named[n].grad = c.sum().to(v.dtype) * v
        if readout is not None:
            self._readout_grads(readout, readout_io["in"].reshape(-1, readout.in_features), e)
        return loss, logits

    def directional_derivatives(self, ydot: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The loss's directional derivative per copy and example, [K, B], from the output tangents [K, B, C] and
        the output error [B, C] (block-parallel stages send it on from here)."""
        return torch.einsum("kbc,bc->kb", ydot, e)

    def _check_batch_norm(self) -> None:
        if (
            self.K > 1
            and self.model.training
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        ):
            raise UsageError(
                "fg-a with --tangents > 1 cannot run batch norm in training mode (the K tangent copies of the "
                "batch would share batch statistics); use --tangents 1"
            )

    def _perturbed_maps(self) -> tuple[list[nn.Module], dict[str, torch.Tensor]]:
        """The modules whose outputs get activity tangents, and the loose parameters' weight tangents (drawn now).

        Attention modules return tuples: their projections are perturbed inside `attention_forward` instead. A
        container's own parameters (a ViT's position embedding on the model itself) are used somewhere inside its
        forward: perturbing the container's output would need a VJP through all of it. They get weight perturbation
        instead, one tangent shared by all examples and copies (unbiased alongside the activity tangents, which are
        independent of it); under orthogonal aggregation they keep the VJP.
        """
        mods = [m for m in self.model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))
                and not isinstance(m, nn.MultiheadAttention)]  # fmt: skip
        loose: dict[str, torch.Tensor] = {}
        if self.aggregation != "orthogonal":
            containers = [(n, m) for n, m in self.model.named_modules() if m in mods
                          and any(next(c.parameters(), None) is not None for c in m.children())]  # fmt: skip
            for prefix, m in containers:
                mods.remove(m)
                for pn, p in m.named_parameters(recurse=False):
                    if p.requires_grad:
                        loose[f"{prefix}.{pn}" if prefix else pn] = self._sample_(torch.empty_like(p))
        return mods, loose

    def _activity_pass(
        self, x: torch.Tensor, mods: list[nn.Module], loose: dict[str, torch.Tensor], readout: nn.Linear | None,
        visit: Callable[[_Record], None], dual: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """One pass over K copies of the batch (per-example, per-copy independent tangents). Every perturbed map's
        output gets tangents u drawn from the step's stream, added to its tangent when `dual` (else only drawn);
        `visit` sees each map with its input and u. Returns (logits [B, C], ydot [K, B, C], the readout's input
        and output)."""
        K, B = self.K, x.shape[0]
        readout_io: dict[str, torch.Tensor] = {}
        busy = []  # set while `visit` runs: a module it calls again (a VJP) is not a new map of the pass

        def seen(rec: _Record) -> None:
            busy.append(True)
            try:
                visit(rec)
            finally:
                busy.pop()

        def perturb(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _Draw]:
            primal, tangent = fwad.unpack_dual(out)
            drawn = _Draw(self._scratch.get_state(), out.shape, out.dtype, out.device)
            u = self._sample_(torch.empty(out.shape, device=out.device, dtype=out.dtype), copies=K)
            if not dual:
                return out, u.view(K, B, *out.shape[1:]), drawn
            # The onward tangent is a tensor of its own: an in-place op downstream must not change u.
            onward = u.clone() if tangent is None else tangent + u
            return fwad.make_dual(primal, onward), u.view(K, B, *out.shape[1:]), drawn

        def inject(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            if busy:
                return None
            primal_in = fwad.unpack_dual(inp[0]).primal[:B]
            if mod is readout:
                readout_io["in"] = primal_in.detach()
                readout_io["out"] = fwad.unpack_dual(out).primal[:B].detach()
                return None
            out, u, drawn = perturb(out)
            params = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            seen(_Record(mod, primal_in.detach(), u, params, rng.pop(mod, None), drawn, batch_stats.pop(mod, None)))
            return out

        def project(mha: nn.MultiheadAttention, which: str, t: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
            """An attention input projection: perturbed like any linear map, its own weights' VJP later."""
            if busy:
                return F.linear(t, w, b)
            out, u, drawn = perturb(F.linear(t, w, b))

            def fn(inp: torch.Tensor) -> torch.Tensor:
                if which == "qkv":
                    return F.linear(inp, mha.in_proj_weight, mha.in_proj_bias)
                return F.linear(inp, *projection_weights(mha)[which])

            params = [p for p in mha.parameters(recurse=False) if p.requires_grad]
            seen(_Record(fn, fwad.unpack_dual(t).primal[:B].detach(), u, params, None, drawn))
            return out

        def draws(mod: nn.Module, _inp: tuple) -> None:
            if not busy:
                rng[mod] = rng_state(x.device)

        # Modules holding dropout: a rerun for their VJP must draw the masks their forward drew.
        rng: dict[nn.Module, list[torch.Tensor]] = {}
        batch_stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # filled by tangent_friendly's norms
        random = [m for m in mods if any(isinstance(s, nn.modules.dropout._DropoutNd) for s in m.modules())]
        handles = [m.register_forward_hook(inject) for m in mods]
        handles += [m.register_forward_pre_hook(draws) for m in random]
        try:
            # No reverse graph: every gradient comes from the recorded inputs and tangents.
            with ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                if dual:
                    stack.enter_context(fwad.dual_level())
                for context in (math_attention(), patched_attention(self.model, project),
                                tangent_friendly(self.model, batch_stats)):  # fmt: skip
                    stack.enter_context(context)
                x_rep = x.repeat(K, *([1] * (x.dim() - 1)))
                if loose:
                    named = dict(self.model.named_parameters())
                    duals = {n: fwad.make_dual(named[n].detach(), v) for n, v in loose.items()}
                    out = functional_call(self.model, duals, (x_rep,))
                else:
                    out = self.model(x_rep)
                primal, tangent = fwad.unpack_dual(out)
                logits = primal[:B].detach().clone()
                ydot = (torch.zeros_like(primal) if tangent is None else tangent).view(K, B, -1)
        finally:
            for hd in handles:
                hd.remove()
        return logits, ydot, readout_io

    def _draw_again(self, rec: _Record) -> torch.Tensor:
        """A record's tangents u [K, B, ...], drawn again from the state they were first drawn from, bit for bit;
        the step's stream is left where it was."""
        assert rec.drawn is not None
        now = self._scratch.get_state()
        self._scratch.set_state(rec.drawn.state)
        try:
            d = rec.drawn
            u = self._sample_(torch.empty(d.shape, dtype=d.dtype, device=d.device), copies=self.K)
        finally:
            self._scratch.set_state(now)
        return u.view(self.K, -1, *d.shape[1:])

    def _map_grads(self, rec: _Record, c: torch.Tensor) -> None:
        """Add one perturbed map's parameter gradients: the VJP of its estimated output gradient sum_k c_k u_k."""
        if rec.u is None and self.K == 1:  # drawn again just now, ours alone: scaled in place, no new tensor
            u = self._draw_again(rec)[0]
            gz = u.mul_(c[0].to(u.dtype).view(-1, *[1] * (u.dim() - 1)))
        else:
            u = rec.u if rec.u is not None else self._draw_again(rec)
            gz = torch.einsum("kb,kb...->b...", c.to(u.dtype), u)
        del u
        grads = layer_param_grads(rec.fn, rec.inp, gz, rec.stats) if isinstance(rec.fn, nn.Module) else None
        if grads is None:
            # A vector-Jacobian product through this one map only, run again: its buffers (running statistics)
            # are put back as the step's forward pass left them.
            buffers = [(b, b.clone()) for b in rec.fn.buffers()] if isinstance(rec.fn, nn.Module) else []
            with torch.enable_grad(), rng_as(rec.rng, rec.inp.device) if rec.rng else nullcontext():
                grads = torch.autograd.grad(rec.fn(rec.inp), rec.params, gz)
            with torch.no_grad():
                for b, before in buffers:
                    b.copy_(before)
        for p, g in zip(rec.params, grads):
            p.grad = g if p.grad is None else p.grad + g


@dataclass
class _Record:
    """A perturbed map of fg-a's generic path: the map, its primal input (first B rows), its tangents [K, B, ...]
    (or None once dropped: `drawn` draws them again) and the parameters its VJP reaches."""

    fn: nn.Module | Callable[[torch.Tensor], torch.Tensor]
    inp: torch.Tensor
    u: torch.Tensor | None
    params: list[nn.Parameter]
    rng: list[torch.Tensor] | None = None  # the global RNG before the map's forward, where it drew dropout masks
    drawn: _Draw | None = None
    stats: tuple[torch.Tensor, torch.Tensor] | None = None  # a batch norm's batch mean and 1/std in its forward


@dataclass
class _Draw:
    """Where a map's tangents came from: the step stream's state before they were drawn, and their tensor's shape
    ([K * B, ...]), dtype and device."""

    state: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
