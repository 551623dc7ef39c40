"""Feedback alignment family: FA, DFA and Directional DFA (FDFA), on any model through its anatomy.

All three replace the backward pass of backprop by random or learned feedback:

- `fa`   (Lillicrap et al. 2016): the error is propagated backwards layer by layer, but through fixed random
  matrices B in place of the transposed weights Wᵀ. Every layer of the anatomy (`nn.Linear`, `nn.Conv1d/2d`, the
  input and output projections of `nn.MultiheadAttention`) gets a B, in any topology: residual sums, batch norm,
  attention and whatever else the model's own `forward` does run as usual (parameter-free maps and norms are
  differentiated exactly; only the transport of weight matrices is replaced).
- `dfa`  (Nøkland 2016): the output error e = ∂L/∂y is sent straight to every block's output through a fixed random
  matrix B_l; the block turns δh_l = e·B_l into its weight updates locally (δa_l = δh_l ⊙ f'(a_l), ΔW_l = δa_lᵀ x_l).
  B_l is kaiming-uniform by default, as in the public FDFA code (`--feedback-init`).
- `fdfa` (Bacho & Chu 2022): as DFA, but B_l is learned: one forward-mode pass with a fresh tangent u_l added to
  every block's output (entries ±1 by default, N(0, 1) as in the paper with `--tangent-dist normal`: either way
  E[u_l u_lᵀ] = I) gives ẏ = Σ_l J_l u_l, so E[ẏ u_lᵀ] = J_l = ∂y/∂h_l, and
  B_l ← (1−λ)B_l + λ·mean_batch(ẏ u_lᵀ), starting from zero. The weight signal e·B_l uses B_l from before this
  step's update by default, as the public code does (`--feedback-timing`). See docs/feedback_alignment.md.

DFA and FDFA use the model's blocks (`bpfree.core.anatomy`): one ordinary forward pass of the model in which every block
output is remembered and passed on detached (so no gradient crosses a block boundary), then one backward pass of
⟨block output, e·B_l⟩ for every block plus the loss for everything after the last block (the readout, exact). On a
flat `nn.Sequential` a block is one weight layer and the parameter-free layers after it (Linear+BatchNorm+ReLU,
Conv+ReLU+MaxPool(+Flatten)), so for a Linear(+BN)+ReLU block this is exactly δa = (e·B) ⊙ f'(a); after a max-pool
the signal is routed to the pooled maxima. Fully connected chains run hand-written formulas (`_DenseBlock`).
Model-specific paths (LocalMixer: `bpfree.fastpaths.localmixer_feedback`) register with `register_fast_path`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import nn

from bpfree.core import tangents as T
from bpfree.core.anatomy import Anatomy, boundaries, eval_mode, example_input, forwards_replaced, uniform_like
from bpfree.core.attention import math_attention, patched_attention
from bpfree.core.errors import UsageError
from bpfree.core.forward_mode import conv_config, renew_dual_level, tangent_friendly
from bpfree.core.registry import Option
from bpfree.methods import METHODS
from bpfree.methods.base import (
    RECOMPUTE,
    Buffers,
    Estimator,
    OptimizerState,
    Replay,
    StepResult,
    output_error,
    set_grad,
    zero_missing_grads,
)
from bpfree.methods.bp import Backprop

PAPER_FA = "Lillicrap et al. 2016, Random synaptic feedback weights support error backpropagation for deep learning"
PAPER_DFA = "Nøkland 2016, Direct Feedback Alignment Provides Learning in Deep Neural Networks"
PAPER_FDFA = "Bacho & Chu 2022, Low-variance Forward Gradients using Direct Feedback Alignment and Momentum"

CONV_LAYERS = (nn.Conv1d, nn.Conv2d)
# Modules with weight matrices this family has no feedback path for: their exact backward would transport weights.
UNSUPPORTED = (nn.RNNBase, nn.RNNCellBase, nn.Bilinear, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
               nn.ConvTranspose3d)  # fmt: skip


def check_layers(model: nn.Module, method: str) -> None:
    """Refuse modules whose backward this family cannot replace (one line, naming the module)."""
    for name, m in model.named_modules():
        if isinstance(m, UNSUPPORTED):
            raise UsageError(f"method {method!r} cannot handle layer {type(m).__name__} ({name or 'the model'}): "
                             "only Linear, Conv1d/2d and MultiheadAttention get feedback matrices")
        if isinstance(m, CONV_LAYERS) and m.padding_mode != "zeros":
            raise UsageError(f"method {method!r} supports only zero-padded convolutions ({name})")


# ----------------------------------------------------------------------------------------------------------------
# FA: autograd Functions whose backward sends the error to the input through B instead of Wᵀ.


class _FALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fb: torch.Tensor):
        ctx.save_for_backward(x, fb)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, fb = ctx.saved_tensors
        grad_x = g @ fb if ctx.needs_input_grad[0] else None  # B in place of W (shape out x in)
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = g2.t() @ x2 if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class _FAConv(torch.autograd.Function):
    """Conv1d / Conv2d (by the weight's rank) with B in place of W in the backward to the input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fb: torch.Tensor,
                conf: tuple) -> torch.Tensor:  # fmt: skip
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(x, fb)
        ctx.conf, ctx.has_bias = conf, bias is not None
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, fb = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        # The weight gradient does not depend on the weight, so one native call with B as the "weight" gives both
        # the FA input signal (transposed convolution with B) and the true local weight/bias gradients.
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            g, x, fb, [fb.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False,
            [0] * len(stride), groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_b],
        )  # fmt: skip
        return grad_x, grad_w, grad_b, None, None


_FAConv2d = _FAConv


def _conv_conf(m: nn.Conv1d | nn.Conv2d) -> tuple:
    conf = conv_config(m)
    if conf is None:
        raise UsageError("fa: padding='same' is supported only for odd kernels with stride 1")
    return conf


def fa_weights(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module, weight) for every weight FA gives a B, in module order: Linear / Conv weights (attention output
    projections included) and each attention's input projection (one fused [3E, E] map, or three)."""
    out: list[tuple[nn.Module, torch.Tensor]] = []
    for m in model.modules():
        if isinstance(m, (nn.Linear, *CONV_LAYERS)):
            out.append((m, m.weight))
        elif isinstance(m, nn.MultiheadAttention):
            if m._qkv_same_embed_dim:
                out.append((m, m.in_proj_weight))
            else:
                out += [(m, m.q_proj_weight), (m, m.k_proj_weight), (m, m.v_proj_weight)]
    return out


def _fa_linear(m: nn.Linear, fb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _FALinear.apply(x, m.weight, m.bias, fb)


def _fa_conv(m: nn.Conv1d | nn.Conv2d, fb: torch.Tensor, conf: tuple, x: torch.Tensor) -> torch.Tensor:
    return _FAConv.apply(x, m.weight, m.bias, fb, conf)


@contextmanager
def feedback_layers(model: nn.Module, weights: list[tuple[nn.Module, torch.Tensor]],
                    feedback: list[torch.Tensor]) -> Iterator[None]:  # fmt: skip
    """While active, every weight in `weights` sends its error back through its B in `feedback` (same order)."""
    fb = {id(w): b for (_, w), b in zip(weights, feedback)}
    swaps = []
    for m, w in weights:
        if isinstance(m, nn.Linear):
            swaps.append((m, partial(_fa_linear, m, fb[id(w)])))
        elif isinstance(m, CONV_LAYERS):
            swaps.append((m, partial(_fa_conv, m, fb[id(w)], _conv_conf(m))))

    def project(mha: nn.MultiheadAttention, which: str, x: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        if which == "qkv":
            B = fb[id(mha.in_proj_weight)]
        elif mha._qkv_same_embed_dim:
            e, i = mha.embed_dim, "qkv".index(which)
            B = fb[id(mha.in_proj_weight)][i * e:(i + 1) * e]
        else:
            B = fb[id(getattr(mha, f"{which}_proj_weight"))]
        return _FALinear.apply(x, w, b, B)

    with forwards_replaced(swaps), patched_attention(model, project):
        yield


@METHODS.register(
    "fa",
    "feedback alignment: backward pass through fixed random matrices instead of transposed weights",
    paper=PAPER_FA,
)
class FeedbackAlignment(Backprop):
    """Backprop's step through the model's own forward pass with every layer's backward through B instead of Wᵀ.

    `feedback[i]` is the B of `weights[i]` (see `fa_weights`), drawn U(±1/√fan_in) in module order.
    """

    acts_on_layer_calls = True

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        check_layers(model, "fa")
        self.weights = fa_weights(model)
        if not self.weights:
            raise UsageError("method 'fa' needs a model with at least one Linear, Conv or attention layer")
        self.feedback = self.parts.feedback = Buffers(
            [uniform_like(w, w[0].numel(), self.generator) for _, w in self.weights])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with feedback_layers(self.model, self.weights, self.feedback):
            return self.model(x)


# ----------------------------------------------------------------------------------------------------------------
# DFA and FDFA: the output error goes straight to each block through B_l (classes x block-output size).


class _DenseBlock:
    """[Flatten] Linear [BatchNorm1d] [ReLU] with hand-written forward, forward-mode and local backward.

    The fast path of DFA/FDFA for fully connected nets (mlp, fc-bn): without autograd's graph and forward-mode AD
    these small nets step markedly faster (docs/performance.md, "Measured choices").
    """

    def __init__(self, block: list[nn.Module]):
        mods = list(block)
        self.flatten = isinstance(mods[0], nn.Flatten)
        mods = mods[1:] if self.flatten else mods
        self.linear: nn.Linear = mods[0]
        self.bn: nn.BatchNorm1d | None = mods[1] if len(mods) > 1 and isinstance(mods[1], nn.BatchNorm1d) else None
        self.relu = isinstance(mods[-1], nn.ReLU)

    @staticmethod
    def try_make(block: list[nn.Module]) -> _DenseBlock | None:
        mods = list(block)
        if mods and isinstance(mods[0], nn.Flatten):
            if mods[0].start_dim != 1 or mods[0].end_dim != -1:
                return None
            mods = mods[1:]
        if not mods or not isinstance(mods[0], nn.Linear):
            return None
        rest = [type(m) for m in mods[1:]]
        if rest not in ([], [nn.BatchNorm1d], [nn.ReLU], [nn.BatchNorm1d, nn.ReLU]):
            return None
        return _DenseBlock(block)

    def forward(self, x: torch.Tensor, x_dot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block output and (if x_dot is given) its tangent; keeps what the local backward needs."""
        if self.flatten:
            x = x.flatten(1)
            x_dot = None if x_dot is None else x_dot.flatten(1)
        self.x = x
        if x_dot is None:
            h, h_dot = F.linear(x, self.linear.weight, self.linear.bias), None
        else:
            # Primal and tangent through the weight as one matmul of 2N rows (cheaper than two of N rows).
            n = x.shape[0]
            both = F.linear(torch.cat([x, x_dot]), self.linear.weight)
            h, h_dot = both[:n], both[n:]
            if self.linear.bias is not None:
                h = h + self.linear.bias
        bn = self.bn
        if bn is not None:
            self.z = h
            # Batch statistics in training mode (or without running stats), as nn.BatchNorm1d decides.
            self.bn_train = bn.training or bn.running_mean is None
            factor = 0.0
            if bn.training and bn.running_mean is not None:
                bn.num_batches_tracked.add_(1)
                factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            # The native kernel also updates the running statistics, exactly as the module would.
            h, self.mean, self.rstd = torch.native_batch_norm(
                h, bn.weight, bn.bias, bn.running_mean, bn.running_var, self.bn_train, factor, bn.eps
            )
            if h_dot is not None:
                # With batch statistics the Jacobian of BN over a batch, γr(I − 11ᵀ/N − x̂x̂ᵀ/N) per unit, is
                # symmetric, so its JVP is the native backward kernel applied to the tangent.
                h_dot = self._bn_backward(h_dot, (True, False, False))[0]
        if self.relu:
            h = torch.relu(h)
            self.h = h
            h_dot = None if h_dot is None else torch.ops.aten.threshold_backward(h_dot, h, 0)
        return h, h_dot

    def _bn_backward(self, g: torch.Tensor, mask: tuple[bool, bool, bool]) -> tuple:
        bn = self.bn
        return torch.ops.aten.native_batch_norm_backward(
            g, self.z, bn.weight, bn.running_mean, bn.running_var, self.mean, self.rstd, self.bn_train, bn.eps,
            list(mask),
        )

    def backward(self, g: torch.Tensor) -> None:
        """Set .grad of the block's parameters from the signal g at its output (one local backward)."""
        if self.relu:
            g = torch.ops.aten.threshold_backward(g, self.h, 0)
        bn = self.bn
        if bn is not None:
            affine = bn.weight is not None
            g, g_gamma, g_beta = self._bn_backward(g, (True, affine, affine))
            if affine:
                set_grad(bn.weight, g_gamma)
                set_grad(bn.bias, g_beta)
        set_grad(self.linear.weight, g.t() @ self.x)
        if self.linear.bias is not None:
            set_grad(self.linear.bias, g.sum(0))
        self.x = self.z = self.h = None  # free the saved activations


class _DirectFeedback(Estimator):
    """Shared machinery of DFA and FDFA: blocks, feedback matrices, local updates from per-block signals.

    Subclasses say whether they need the forward-mode tangents (`use_tangents`), how B starts and how it learns.
    """

    method = ""
    use_tangents = False
    tangent_dist = "normal"
    feedback_timing = "before"  # learned B (use_tangents): the weight signal takes B from before or after its update

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        self.recompute = self.options["recompute"]
        # B_l has shape (classes, numel of block l's output); made at the first step, when the shapes are known.
        self.feedback = None
        self.fast: list[_DenseBlock] | None = None
        # This step's draws of the tangents u_l (FDFA): u_l is drawn again when B_l learns, not kept.
        self._draws: list[_Draw] = []
        # One buffer kept between steps for a u that dies at once (added into its block's own tangent, or read
        # to learn B_l): fresh tensors as large as a block output would be faulted in again every step.
        self._scratch = torch.empty(0)
        self._into: torch.Tensor | None = None  # where the next `_tangent` draws, if not into a fresh tensor
        self._setup()

    def _setup(self) -> None:
        check_layers(self.model, self.method)
        anatomy = self.anatomy
        if not anatomy.blocks:
            raise UsageError(
                f"method {self.method!r} needs a model with at least one hidden block before the readout (found "
                "none; name them with --blocks)"
            )
        self.fast, self.readout = _dense_chain(anatomy) if not self.recompute else (None, None)
        # Set on the first step: whether an in-place op after a block (ReLU(inplace=True)) would overwrite the block
        # output that its local backward needs; then the next block gets a copy instead of a detached view.
        self._copy_boundaries: bool | None = None

    @property
    def feedback(self) -> Buffers | None:
        """The B_l (buffers of `parts`), or None before the first step."""
        return self.parts.feedback if len(self.parts.feedback) else None

    @feedback.setter
    def feedback(self, tensors: list[torch.Tensor] | None) -> None:
        self.parts.feedback = Buffers(tensors or [])

    def init_feedback(self, outs: list[torch.Tensor], classes: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def learn_feedback(self, y_dot: torch.Tensor, tangents: Sequence[torch.Tensor]) -> None:
        """FDFA's update of every B from the forward-mode pass (DFA keeps B fixed); `tangents` may draw each u_l
        as it is read (`_Redrawn`)."""
        for i, u in enumerate(tangents):
            self.learn_block_feedback(i, y_dot, u)

    def learn_block_feedback(self, i: int, y_dot: torch.Tensor, u: torch.Tensor) -> None:
        """FDFA's update of B_i from the output tangent and block i's tangent u."""

    def _tangent(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Block i's tangent u_i, in a fresh tensor (or where `_into` says); where it was drawn from is recorded
        (`_redrawn`)."""
        self._draws.append(_Draw(self.generator.get_state(), tuple(like.shape), like.new_empty(0)))
        into, self._into = self._into, None
        return self._draw(like.new_empty(like.shape) if into is None else into)  # contiguous: filled in order

    def _scratch_like(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The kept buffer as a contiguous tensor of `shape`, with `like`'s dtype and device (grown when too
        small)."""
        n = math.prod(shape)
        buf = self._scratch
        if buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._scratch = like.new_empty(n)
        return buf[:n].view(shape)

    def _redrawn(self) -> _Redrawn:
        """This step's tangents u_l, each drawn again, bit for bit, when it is read."""
        return _Redrawn(self, self._draws)

    def _draw(self, out: torch.Tensor) -> torch.Tensor:
        """Tangents drawn into `out`, per example (data-parallel: this rank's rows of the global batch's)."""
        return self.sample_rows_(lambda t: T.sample_(t, self.tangent_dist, self.generator), out)

    def _forward_fast(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, Any]:
        h, h_dot, outs, tangents = x, None, [], []
        self._draws = []
        assert self.fast is not None
        for i, block in enumerate(self.fast):
            h, h_dot = block.forward(h, h_dot)
            outs.append(h)
            if self.use_tangents:
                u = self._tangent(i, h)
                h_dot = u if h_dot is None else h_dot.add_(u)
                del u
        lin = self.readout
        self._last_hidden = h
        logits = F.linear(h, lin.weight, lin.bias)
        y_dot = None if h_dot is None else F.linear(h_dot, lin.weight)
        return outs, self._redrawn() if self.use_tangents else tangents, logits, y_dot

    @staticmethod
    def _owned(tangent: torch.Tensor, drawn: list[weakref.ref]) -> bool:
        """Whether a block output's tangent is a dense tensor of its own, made inside the block (not a view, not an
        expanded zero, not one of the drawn tangents u still alive), so that adding u to it in place changes nothing
        else."""
        if tangent._base is not None or not tangent.is_contiguous() or tangent.is_inference():
            return False
        ptr = tangent.untyped_storage().data_ptr()
        return all(u is None or u.untyped_storage().data_ptr() != ptr for u in (ref() for ref in drawn))

    def _boundaries_overwritten(self) -> bool:
        """Probe once (eval mode, no gradients): does anything after a block modify its output in place?"""
        seen: list[tuple[torch.Tensor, int]] = []

        def look(_i: int, out: torch.Tensor) -> torch.Tensor:
            seen.append((out, out._version))
            return out.detach()

        model = self.model
        with eval_mode(model), torch.no_grad(), boundaries(self.anatomy, look):
            model(example_input(model, self.anatomy.input_shape))
        return any(out._version != v for out, v in seen)

    def _forward_generic(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, Any]:
        """One pass of the model's own forward; block outputs remembered and passed on cut from their graph."""
        if self._copy_boundaries is None:
            self._copy_boundaries = self._boundaries_overwritten()
        copy = self._copy_boundaries
        outs: list[torch.Tensor] = []
        self._draws = []
        drawn: list[weakref.ref] = []  # this pass's u, while something (an onward tangent) still holds them

        def cut(i: int, out: torch.Tensor) -> torch.Tensor:
            outs.append(out)
            if not self.use_tangents:
                nxt = out.detach()
                return nxt.clone() if copy else nxt
            primal, tangent = fwad.unpack_dual(out)
            owned = tangent is not None and self._owned(tangent, drawn)
            if owned:
                self._into = self._scratch_like(tuple(primal.shape), primal)  # u dies in the addition below
            u = self._tangent(i, primal)
            drawn.append(weakref.ref(u))
            # Next block: cut primal (local reverse graphs); tangent = what flowed in + this block's u. u itself is
            # not kept (B_l learns from u_l drawn again), so an in-place op downstream may change it.
            if tangent is None:
                onward = u
            elif owned:
                onward = tangent.detach().add_(u)  # the block's own tangent, dead after this boundary: no new tensor
            else:
                onward = tangent.detach() + u
            nxt = primal.detach()
            del tangent, u
            # Only the detached onward tangent crosses the boundary: a new forward-AD level frees the tangents made
            # inside the block, and the reverse graph their arithmetic recorded, instead of holding them to the end.
            renew_dual_level()
            return fwad.make_dual(nxt.clone() if copy else nxt, onward)

        y_dot = None
        with ExitStack() as stack:
            if self.use_tangents:
                stack.enter_context(fwad.dual_level())
                stack.enter_context(math_attention())
                stack.enter_context(tangent_friendly(self.model))
            stack.enter_context(boundaries(self.anatomy, cut))
            logits = self.model(x)
            if self.use_tangents:
                tangent = fwad.unpack_dual(logits).tangent
                y_dot = torch.zeros_like(logits) if tangent is None else tangent.detach()
        return outs, self._redrawn() if self.use_tangents else [], logits, y_dot

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if self.recompute:
            return self._step_recompute(x, y)
        if self.fast is not None:
            with torch.no_grad():
                outs, tangents, logits, y_dot = self._forward_fast(x)
        else:
            outs, tangents, logits, y_dot = self._forward_generic(x)
        if self.feedback is None:
            self.feedback = self.init_feedback(outs, logits.shape[1])
        learns = self.use_tangents
        if learns and self.feedback_timing == "after":
            self.learn_feedback(y_dot, tangents)
        loss, e = output_error(self, logits, y)
        params = self.trainable()
        for p in params:
            p.grad = None
        # Each block's signal e·B_l is made just before its local backward (B before this step's update when the
        # timing is "before": the update comes after), so at most one signal is alive.
        if self.fast is not None:
            with torch.no_grad():
                for block, b, o in zip(self.fast, self.feedback, outs):
                    block.backward((e @ b).view_as(o))
                lin = self.readout  # the readout's exact gradient
                set_grad(lin.weight, e.t() @ self._last_hidden)
                if lin.bias is not None:
                    set_grad(lin.bias, e.sum(0))
            self._last_hidden = None
        else:
            # Every block's input was cut from its graph: one independent local backward per block (⟨h_l, e·B_l⟩),
            # last block first, each freeing its graph, and the readout's exact one (⟨y, e⟩).
            if logits.requires_grad:
                torch.autograd.backward(logits, e)
            while outs:
                out = outs.pop()
                if out.requires_grad:
                    torch.autograd.backward(out, (e @ self.feedback[len(outs)]).view_as(out))
                del out
        if learns and self.feedback_timing == "before":
            self.learn_feedback(y_dot, tangents)
        zero_missing_grads(params)
        return StepResult(loss, logits.detach())

    def _step_recompute(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Block at a time, in two passes. The first runs without a reverse graph (FDFA: with tangents) for the
        output error e (and ẏ); the second, with the same randomness, buffers and tangents, runs each block's local
        backward of ⟨h_l, e·B_l⟩ at its boundary (FDFA: and learns B_l there, u_l drawn again), so no block's graph
        outlives it. Same gradients as one pass; one more forward pass; activation memory flat in depth."""
        replay = Replay(self.model, x.device)
        drawn = self.generator.get_state()
        shapes: list[torch.Tensor] = []

        def first(i: int, out: torch.Tensor) -> torch.Tensor:
            primal, tangent = fwad.unpack_dual(out)
            if self.feedback is None:
                shapes.append(primal.new_empty((1, *primal.shape[1:])))
            if not self.use_tangents:
                return out
            u = self._draw(torch.empty_like(primal))
            return fwad.make_dual(primal, u if tangent is None else tangent + u)

        with torch.no_grad(), self._passes(first, dual=self.use_tangents):
            out = self.model(x)
            logits, tangent = fwad.unpack_dual(out)
            y_dot = None
            if self.use_tangents:
                y_dot = torch.zeros_like(logits) if tangent is None else tangent.detach().clone()
            logits = logits.detach().clone()
            del out, tangent
        if self.feedback is None:
            self.feedback = self.init_feedback(shapes, logits.shape[1])
        loss, e = output_error(self, logits, y)
        params = self.trainable()
        for p in params:
            p.grad = None
        self.generator.set_state(drawn)

        def second(i: int, out: torch.Tensor) -> torch.Tensor:
            assert self.feedback is not None
            if self.use_tangents:
                u = self._draw(torch.empty_like(out))
                if self.feedback_timing == "after":
                    self.learn_block_feedback(i, y_dot, u)
            signal = (e @ self.feedback[i]).view_as(out)
            if self.use_tangents and self.feedback_timing == "before":
                self.learn_block_feedback(i, y_dot, u)
            if out.requires_grad:
                torch.autograd.backward(out, signal)
            return out.detach()

        with replay.again(), torch.enable_grad(), self._passes(second, dual=False):
            again = self.model(x)
            if again.requires_grad:
                torch.autograd.backward(again, e)  # the readout's exact gradient
        zero_missing_grads(params)
        return StepResult(loss, logits)

    @contextmanager
    def _passes(self, at_boundary: Any, dual: bool) -> Iterator[None]:
        """The contexts of a pass of the recomputing step (the same primal arithmetic in both passes)."""
        with ExitStack() as stack:
            if dual:
                stack.enter_context(fwad.dual_level())
            if self.use_tangents:
                stack.enter_context(math_attention())
                stack.enter_context(tangent_friendly(self.model))
            stack.enter_context(boundaries(self.anatomy, at_boundary))
            yield


@dataclass
class _Draw:
    """Where a tangent u came from: the generator's state before its draw, its shape, dtype and device."""

    state: torch.Tensor
    shape: tuple[int, ...]
    like: torch.Tensor  # empty, of u's dtype and device


class _Redrawn(Sequence):
    """A step's tangents u_l, each drawn again from its recorded state when read, into the estimator's kept buffer:
    a u read is valid until the next read. The generator is left where it was."""

    def __init__(self, estimator: _DirectFeedback, draws: list[_Draw]):
        self.estimator, self.draws = estimator, list(draws)

    def __len__(self) -> int:
        return len(self.draws)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        draw = self.draws[i]
        generator = self.estimator.generator
        resume = generator.get_state()
        generator.set_state(draw.state)
        try:
            return self.estimator._draw(self.estimator._scratch_like(draw.shape, draw.like))
        finally:
            generator.set_state(resume)


def _dense_chain(anatomy: Anatomy) -> tuple[list[_DenseBlock] | None, nn.Linear | None]:
    """The hand-written path's blocks and readout when the model is an nn.Sequential of [Flatten] Linear [BN1d]
    [ReLU] blocks ending in one Linear; (None, None) otherwise."""
    model = anatomy.model
    if not isinstance(model, nn.Sequential):
        return None, None
    children = list(model)
    last = max(i for i, c in enumerate(children) if c is anatomy.blocks[-1].exit)
    readout = children[last + 1:]
    dense = [_DenseBlock.try_make(b.modules) for b in anatomy.blocks]
    if len(readout) != 1 or not isinstance(readout[0], nn.Linear) or not all(dense):
        return None, None
    return dense, readout[0]  # type: ignore[return-value]


FEEDBACK_INITS = ("kaiming-uniform", "normal")


def dfa_feedback(classes: int, like: torch.Tensor, init: str, generator: torch.Generator) -> torch.Tensor:
    """A fixed DFA matrix B (classes x n, n = numel of one example of `like`).

    kaiming-uniform: U(±√(6/n)), std √(2/n) (PyTorch's kaiming_uniform_ defaults on a classes x n matrix, the public
    FDFA code's DFA). normal: N(0, 1/classes), so e·B has the scale of one entry of e whatever the width.
    """
    n = like[0].numel()
    if init == "normal":
        return torch.randn(classes, n, generator=generator, device=like.device, dtype=like.dtype) * classes**-0.5
    u = torch.rand(classes, n, generator=generator, device=like.device, dtype=like.dtype)
    return (2 * u - 1) * (6 / n) ** 0.5


@METHODS.register(
    "dfa",
    "direct feedback alignment: output error sent to every hidden layer through fixed random matrices",
    options={
        "recompute": RECOMPUTE,
        "feedback_init": Option(
            "kaiming-uniform",
            "fixed B: kaiming-uniform U(±√(6/n)) for n outputs (the public FDFA code) or normal N(0, 1/classes)",
            choices=FEEDBACK_INITS,
        ),
    },
    paper=PAPER_DFA,
)
class DirectFeedbackAlignment(_DirectFeedback):
    method = "dfa"

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        self.feedback_init = self.options["feedback_init"]

    def init_feedback(self, outs: list[torch.Tensor], classes: int) -> list[torch.Tensor]:
        return [dfa_feedback(classes, o, self.feedback_init, self.generator) for o in outs]


FEEDBACK_OPTIMIZERS = ("average", "adam", "sgd")
FEEDBACK_TIMINGS = ("before", "after")


@METHODS.register(
    "fdfa",
    "directional DFA: DFA whose feedback matrices track the output Jacobians, learned by one forward-mode pass",
    options={
        "recompute": RECOMPUTE,
        "feedback_lr": Option(1e-2, "rate of B: moving-average λ (at most 1), or the feedback optimizer's learning "
                              "rate", above=0),
        "feedback_optimizer": Option(
            "average",
            "how B learns: average = B ← (1−λ)B + λ·mean(ẏuᵀ); adam / sgd = that optimizer on ½‖B − mean(ẏuᵀ)‖²",
            choices=FEEDBACK_OPTIMIZERS,
        ),
        "tangent_dist": Option(
            "rademacher", "tangent entries: rademacher (±1: lower variance, cheaper to draw) or normal (the paper's)",
            choices=T.DISTS,
        ),
        "feedback_timing": Option(
            "before",
            "the weight signal e·B uses B from before this step's feedback update (the public code) or after it",
            choices=FEEDBACK_TIMINGS,
        ),
    },
    paper=PAPER_FDFA,
)
class DirectionalDFA(_DirectFeedback):
    """`--feedback-optimizer adam` is the public code's choice (Adam, lr 1e-4 on B); `sgd` without momentum is the
    moving average itself (B − λ(B − estimate)), kept as a check of the optimizer path."""

    method = "fdfa"
    use_tangents = True

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        o = self.options
        self.feedback_lr, self.feedback_optimizer = o["feedback_lr"], o["feedback_optimizer"]
        self.tangent_dist, self.feedback_timing = o["tangent_dist"], o["feedback_timing"]
        if self.feedback_optimizer == "average" and self.feedback_lr > 1:  # a moving average's weight
            raise UsageError(f"fdfa: --feedback-lr must be in (0, 1] for the moving average, got {self.feedback_lr}")
        self.parts.feedback_optimizer = OptimizerState()
        self.parts.feedback_optimizer.make = self._make_optimizer

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """B's optimizer (`--feedback-optimizer adam|sgd`), made at its first use; its state is in `parts`."""
        return self.parts.feedback_optimizer.optimizer

    def init_feedback(self, outs: list[torch.Tensor], classes: int) -> list[torch.Tensor]:
        return [torch.zeros(classes, o[0].numel(), device=o.device, dtype=o.dtype) for o in outs]

    def _make_optimizer(self) -> None:
        assert self.feedback is not None
        kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[self.feedback_optimizer]
        self.parts.feedback_optimizer.optimizer = kind(self.feedback, lr=self.feedback_lr)

    def learn_block_feedback(self, i: int, y_dot: torch.Tensor, u: torch.Tensor) -> None:
        lam, n = self.feedback_lr, y_dot.shape[0]
        assert self.feedback is not None
        b = self.feedback[i]
        with torch.no_grad():
            mean = None  # data-parallel: the global batch's mean(ẏuᵀ), as on one process
            if self.group.active:
                mean = y_dot.t() @ u.reshape(n, -1) / n
                self.group.weighted_mean_([mean], self.shard.weight if self.shard is not None else n)
            if self.feedback_optimizer == "average":
                # B ← (1−λ)B + λ·mean_batch(ẏ uᵀ), in place (one addmm on one process).
                if mean is None:
                    b.mul_(1 - lam).addmm_(y_dot.t(), u.reshape(n, -1), alpha=lam / n)
                else:
                    b.mul_(1 - lam).add_(mean, alpha=lam)
                return
            if self.optimizer is None:
                self._make_optimizer()
            assert self.optimizer is not None
            # One B at a time: the optimizer steps only parameters with a gradient, so each B_i takes exactly one
            # step per training step however the blocks are visited. ∇ ½‖B − mean(ẏuᵀ)‖² = B − mean(ẏuᵀ).
            b.grad = torch.addmm(b, y_dot.t(), u.reshape(n, -1), alpha=-1 / n) if mean is None else b - mean
            self.optimizer.step()
            b.grad = None
