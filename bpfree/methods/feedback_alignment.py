"""Feedback alignment family: FA, DFA and Directional DFA (FDFA).

All three replace the backward pass of backprop by random or learned feedback:

- `fa`   (Lillicrap et al. 2016): the error is propagated backwards layer by layer, but through fixed random
  matrices B in place of the transposed weights Wᵀ (Linear and Conv2d layers).
- `dfa`  (Nøkland 2016): the output error e = ∂L/∂y is sent straight to every hidden block through a fixed random
  matrix B_l; the block turns δh_l = e·B_l into its weight updates locally (δa_l = δh_l ⊙ f'(a_l), ΔW_l = δa_lᵀ x_l).
  B_l is kaiming-uniform by default, as in the public FDFA code (`--feedback-init`).
- `fdfa` (Bacho & Chu 2022): as DFA, but B_l is learned: one forward-mode pass with a fresh tangent u_l ~ N(0, I)
  added to every hidden block's output gives ẏ = Σ_l J_l u_l, so E[ẏ u_lᵀ] = J_l = ∂y/∂h_l, and
  B_l ← (1−λ)B_l + λ·mean_batch(ẏ u_lᵀ), starting from zero. The weight signal e·B_l uses B_l from before this
  step's update by default, as the public code does (`--feedback-timing`). See docs/feedback_alignment.md.

A "block" is the stretch of a flat `nn.Sequential` from one weight layer (Linear / Conv2d) up to the next one, e.g.
Linear+BatchNorm+ReLU or Conv+ReLU+MaxPool(+Flatten); the last block is the output layer. DFA and FDFA feed their
signal to each hidden block's *output* and push it back through that block only (its BatchNorm, activation and
pooling included), so each block's update needs nothing but its own input and the feedback signal. For a
Linear(+BN)+ReLU block this is exactly δa = (e·B) ⊙ f'(a); after a max-pool the signal is routed to the pooled maxima.
On a LocalMixer, `dfa` treats every unit (linear -> LN -> [+residual] -> ReLU) as such a block; `fdfa` does not take it.

`fa` on a LocalMixer is FA of the global loss through every block. `l-fa`, `lg-fa` (FA under local losses) live
with the local rules: `bpfree.methods.block_local`, and `bpfree.fastpaths.localmixer_local` on LocalMixer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import nn

from bpfree import tangents as T
from bpfree.errors import UsageError
from bpfree.methods import METHODS
from bpfree.methods.base import Estimator, StepResult
from bpfree.methods.bp import Backprop
from bpfree.models.localmixer import LinearHook, LocalMixer, MixerBlock, layer_norm, unit_params, unit_weight_grads
from bpfree.registry import Option

PAPER_FA = "Lillicrap et al. 2016, Random synaptic feedback weights support error backpropagation for deep learning"
PAPER_DFA = "Nøkland 2016, Direct Feedback Alignment Provides Learning in Deep Neural Networks"
PAPER_FDFA = "Bacho & Chu 2022, Low-variance Forward Gradients using Direct Feedback Alignment and Momentum"

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Layers without parameters that may sit anywhere in a block (activations, pooling, reshaping, regularisers).
FREE_LAYERS = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity,
)  # fmt: skip


def flat_layers(model: nn.Module, method: str) -> list[nn.Module]:
    """The model's leaf layers in order, checking that each is one this family knows how to handle."""
    if not isinstance(model, nn.Sequential):
        raise UsageError(
            f"method {method!r} needs a model that is an nn.Sequential of Linear/Conv2d/BatchNorm/activation/pooling "
            f"layers (e.g. mlp, fc-bn, cnn-small), got {type(model).__name__}"
        )
    out: list[nn.Module] = []
    for m in model:
        if isinstance(m, nn.Sequential):
            out += flat_layers(m, method)
        elif isinstance(m, WEIGHT_LAYERS + NORM_LAYERS + FREE_LAYERS):
            out.append(m)
        else:
            raise UsageError(f"method {method!r} cannot handle layer {type(m).__name__} in the model")
    for m in out:
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise UsageError(f"method {method!r} supports only zero-padded convolutions")
    return out


def split_blocks(layers: list[nn.Module], method: str) -> tuple[list[nn.Sequential], nn.Sequential]:
    """Cut the layers into blocks, each starting at a weight layer; returns (hidden blocks, output block)."""
    starts = [i for i, m in enumerate(layers) if isinstance(m, WEIGHT_LAYERS)]
    if len(starts) < 2:
        raise UsageError(f"method {method!r} needs a model with at least one hidden weight layer")
    if any(isinstance(m, NORM_LAYERS) for m in layers[: starts[0]]):
        raise UsageError(f"method {method!r}: a BatchNorm before the first weight layer is not supported")
    bounds = [0, *starts[1:], len(layers)]  # parameter-free layers before the first weight layer join block 0
    blocks = [nn.Sequential(*layers[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return blocks[:-1], blocks[-1]


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
        grad_w = g2.t() @ x2
        grad_b = g2.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class _FAConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fb: torch.Tensor,
                conf: tuple) -> torch.Tensor:  # fmt: skip
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(x, fb)
        ctx.conf, ctx.has_bias = conf, bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, fb = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        # The weight gradient does not depend on the weight, so one native call with B as the "weight" gives both
        # the FA input signal (transposed convolution with B) and the true local weight/bias gradients.
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            g, x, fb, [fb.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False, [0, 0], groups,
            [ctx.needs_input_grad[0], True, ctx.has_bias],
        )  # fmt: skip
        return grad_x, grad_w, grad_b, None, None


def _conv_conf(m: nn.Conv2d) -> tuple:
    padding = m.padding
    if isinstance(padding, str):  # "valid" / "same" given as strings: convert to explicit zero padding
        if padding == "valid":
            padding = (0, 0)
        elif all(k % 2 == 1 for k in m.kernel_size) and m.stride in (1, (1, 1)):
            padding = tuple(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
        else:
            raise UsageError("fa: padding='same' is supported only for odd kernels with stride 1")
    return (list(m.stride), list(padding), list(m.dilation), m.groups)


class _FAGrouped(torch.autograd.Function):
    """LocalMixer's grouped linear (t [..., G*i] -> [..., G*o], weight [G, o, i]) with B in place of W backwards."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        tg = t.unflatten(-1, (weight.shape[0], -1))
        ctx.save_for_backward(tg, fb)
        return torch.einsum("...gi,goi->...go", tg, weight).flatten(-2) + bias

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        tg, fb = ctx.saved_tensors
        gg = g.unflatten(-1, (fb.shape[0], -1))
        grad_t = torch.einsum("...go,goi->...gi", gg, fb).flatten(-2) if ctx.needs_input_grad[0] else None
        grad_w = torch.einsum("...go,...gi->goi", gg, tg)
        return grad_t, grad_w, g.flatten(0, -2).sum(0), None


def random_feedback(weight: torch.Tensor, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """A fixed B of W's shape, U(±1/√fan_in): the scale of PyTorch's default init of W. Every FA variant uses it."""
    u = torch.rand(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
    return (2 * u - 1) * fan_in**-0.5


def mixer_feedback(
    model: LocalMixer, generator: torch.Generator, heads: bool, readout: bool
) -> dict[str, torch.Tensor]:
    """Feedback matrices for a LocalMixer's linear maps, keyed by their weights' parameter names."""
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        if block.token_mix is not None:
            out[f"blocks.{i}.token_mix.weight"] = random_feedback(block.token_mix.weight, model.patches, generator)
        out[f"blocks.{i}.channel.weight"] = random_feedback(block.channel.weight, block.channel.in_features, generator)
        out[f"blocks.{i}.group_weight"] = random_feedback(block.group_weight, block.group_weight.shape[-1], generator)
    for i, head in enumerate(model.heads if heads else []):
        out[f"heads.{i}.weight"] = random_feedback(head.weight, head.in_features, generator)
    if readout:
        out["readout.weight"] = random_feedback(model.readout.weight, model.readout.in_features, generator)
    return out


def mixer_linear_hook(i: int, block: MixerBlock, feedback: dict[str, torch.Tensor]) -> LinearHook:
    """Block i's unit linear maps with B in place of W in their backward (see `MixerBlock.forward`)."""

    def linear(kind: str, t: torch.Tensor) -> torch.Tensor:
        if kind == "token":
            m = block.token_mix
            assert m is not None
            fb = feedback[f"blocks.{i}.token_mix.weight"]
            return _FALinear.apply(t.transpose(-1, -2), m.weight, m.bias, fb).transpose(-1, -2)
        if kind == "channel":
            fb = feedback[f"blocks.{i}.channel.weight"]
            return _FALinear.apply(t, block.channel.weight, block.channel.bias, fb)
        return _FAGrouped.apply(t, block.group_weight, block.group_bias, feedback[f"blocks.{i}.group_weight"])

    return linear


def _clone(feedback: Any, device: torch.device | None = None) -> Any:
    """Copy a list or name -> tensor dict of feedback matrices (checkpoints), optionally to a device."""
    if feedback is None:
        return None
    if isinstance(feedback, dict):
        return {k: v.to(device) if device is not None else v.clone() for k, v in feedback.items()}
    return [b.to(device) if device is not None else b.clone() for b in feedback]


@METHODS.register(
    "fa",
    "feedback alignment: backward pass through fixed random matrices instead of transposed weights",
    paper=PAPER_FA,
)
class FeedbackAlignment(Backprop):
    """Backprop's step through a forward pass whose weight layers send the error back through B instead of Wᵀ.

    On a LocalMixer (the paper's "FA" row) every linear map of every block and the readout get a B; the global
    loss trains the blocks end to end, the local heads take no part (zero gradient), as under `bp`.
    """

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed=seed, **options)
        self.feedback: Any
        if isinstance(model, LocalMixer):
            self.layers: list[nn.Module] | None = None
            self.feedback = mixer_feedback(model, self.generator, heads=False, readout=True)
            return
        self.layers = flat_layers(model, "fa")
        # One fixed B per weight layer, same shape and scale as PyTorch's default init of W (U(±1/sqrt(fan_in))).
        self.feedback = [
            random_feedback(m.weight, m.weight[0].numel(), self.generator)
            for m in self.layers
            if isinstance(m, WEIGHT_LAYERS)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward pass, with each weight layer replaced by its FA Function."""
        if self.layers is None:  # LocalMixer: tokens -> blocks -> pooled -> LN -> readout, as its forward
            model = self.model
            assert isinstance(model, LocalMixer)
            h = model.tokens(x)
            for i, block in enumerate(model.blocks):
                h = block(h, mixer_linear_hook(i, block, self.feedback))
            ro = model.readout
            return _FALinear.apply(layer_norm(model.pooled(h)), ro.weight, ro.bias, self.feedback["readout.weight"])
        h, k = x, 0
        for m in self.layers:
            if isinstance(m, nn.Linear):
                h = _FALinear.apply(h, m.weight, m.bias, self.feedback[k])
                k += 1
            elif isinstance(m, nn.Conv2d):
                h = _FAConv2d.apply(h, m.weight, m.bias, self.feedback[k], _conv_conf(m))
                k += 1
            else:
                h = m(h)
        return h

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "feedback": _clone(self.feedback)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.feedback = _clone(state["feedback"], next(self.model.parameters()).device)


# ----------------------------------------------------------------------------------------------------------------
# DFA and FDFA: the output error goes straight to each hidden block through B_l (classes x block-output size).


class _DenseBlock:
    """[Flatten] Linear [BatchNorm1d] [ReLU] with hand-written forward, forward-mode and local backward.

    The fast path of DFA/FDFA for fully connected nets (mlp, fc-bn). Skipping autograd's graph (and, for FDFA,
    forward-mode AD) matters: on fc-bn (2x800, batch 64, 1 CPU thread, thread CPU time) the autograd versions took
    ~0.95x (dfa) and ~1.75x (fdfa) of a bp step, these formulas ~0.85x and ~1.15x
    (benchmarks/feedback_alignment.py speed).
    """

    def __init__(self, block: nn.Sequential):
        mods = list(block)
        self.flatten = isinstance(mods[0], nn.Flatten)
        mods = mods[1:] if self.flatten else mods
        self.linear: nn.Linear = mods[0]
        self.bn: nn.BatchNorm1d | None = mods[1] if len(mods) > 1 and isinstance(mods[1], nn.BatchNorm1d) else None
        self.relu = isinstance(mods[-1], nn.ReLU)

    @staticmethod
    def try_make(block: nn.Sequential) -> _DenseBlock | None:
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
            # Primal and tangent through the weight as ONE matmul of 2N rows: on 800x800, N = 64, one CPU thread
            # this took ~2.0 ms against ~3.0 ms for two separate ones.
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
                _set_grad(bn.weight, g_gamma)
                _set_grad(bn.bias, g_beta)
        _set_grad(self.linear.weight, g.t() @ self.x)
        if self.linear.bias is not None:
            _set_grad(self.linear.bias, g.sum(0))
        self.x = self.z = self.h = None  # free the saved activations


def _set_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    if p.requires_grad:
        p.grad = g


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
        # B_l has shape (classes, numel of block l's output); made at the first step, when the shapes are known.
        self.feedback: list[torch.Tensor] | None = None
        self.mixer = isinstance(model, LocalMixer)
        if self.mixer:
            if self.use_tangents:
                raise UsageError(f"method {self.method!r} does not support localmixer-* models; use dfa, fa or lg-fa")
            self.fast = None
            return
        self.hidden, self.output = split_blocks(flat_layers(model, self.method), self.method)
        dense = [_DenseBlock.try_make(b) for b in self.hidden]
        out_is_linear = len(self.output) == 1 and isinstance(self.output[0], nn.Linear)
        # Fast path (hand-written formulas, no autograd) when every block is [Flatten] Linear [BN1d] [ReLU].
        self.fast: list[_DenseBlock] | None = dense if out_is_linear and all(dense) else None

    def init_feedback(self, outs: list[torch.Tensor], classes: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def learn_feedback(self, y_dot: torch.Tensor, tangents: list[torch.Tensor]) -> None:
        """FDFA's update of B from the forward-mode pass (DFA keeps B fixed)."""

    def _tangent(self, like: torch.Tensor) -> torch.Tensor:
        return T.sample(like.shape, self.tangent_dist, self.generator, device=like.device, dtype=like.dtype)

    def _forward_fast(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, Any]:
        h, h_dot, outs, tangents = x, None, [], []
        for block in self.fast:
            h, h_dot = block.forward(h, h_dot)
            outs.append(h)
            if self.use_tangents:
                u = self._tangent(h)
                tangents.append(u)
                h_dot = u if h_dot is None else h_dot.add_(u)
        lin = self.output[0]
        self._last_hidden = h
        logits = F.linear(h, lin.weight, lin.bias)
        y_dot = None if h_dot is None else F.linear(h_dot, lin.weight)
        return outs, tangents, logits, y_dot

    def _forward_generic(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, Any]:
        outs, tangents, y_dot = [], [], None
        with fwad.dual_level():
            h = x
            for block in self.hidden:
                out = block(h)
                outs.append(out)
                if self.use_tangents:
                    primal, tangent = fwad.unpack_dual(out)
                    u = self._tangent(primal)
                    tangents.append(u)
                    # Next block: detached primal (local reverse graphs); tangent = what flowed in + this block's u.
                    h = fwad.make_dual(primal.detach(), u if tangent is None else tangent.detach() + u)
                else:
                    h = out.detach()  # detached input: each block's graph is its own
            logits = self.output(h)
            if self.use_tangents:
                y_dot = fwad.unpack_dual(logits).tangent.detach()
        return outs, tangents, logits, y_dot

    def _step_mixer(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """DFA on a LocalMixer: every unit (linear -> LN -> [+residual] -> ReLU) of every block is a DFA layer.
        Its signal e·B_l [B, P, C] at the unit output goes through that unit's ReLU, LN and linear only; the readout
        takes its exact gradient, the local heads none (zero)."""
        model = self.model
        assert isinstance(model, LocalMixer)
        with torch.no_grad():
            h, traced = model.tokens(x), []
            for block in model.blocks:
                h, units = block.trace(h)
                traced += [(block, u) for u in units]
            feats = layer_norm(model.pooled(h))
            logits = model.readout(feats)
        leaf = logits.requires_grad_()
        with torch.enable_grad():
            loss = self.loss_fn(leaf, y)
            (e,) = torch.autograd.grad(loss, leaf)
        if self.feedback is None:
            self.feedback = self.init_feedback([unit.live.flatten(1) for _, unit in traced], logits.shape[1])
        with torch.no_grad():
            for (block, unit), b in zip(traced, self.feedback):
                grad_a = (e @ b).view_as(unit.live) * unit.live  # through the unit's ReLU (and residual sum)
                w, bias = unit_params(block, unit.kind)
                w.grad, bias.grad = unit_weight_grads(block, unit, grad_a)
            model.readout.weight.grad, model.readout.bias.grad = e.t() @ feats, e.sum(0)
            for head in model.heads:
                head.weight.grad, head.bias.grad = torch.zeros_like(head.weight), torch.zeros_like(head.bias)
        return StepResult(loss.detach(), logits.detach())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if self.mixer:
            return self._step_mixer(x, y)
        if self.fast is not None:
            with torch.no_grad():
                outs, tangents, logits, y_dot = self._forward_fast(x)
        else:
            outs, tangents, logits, y_dot = self._forward_generic(x)
        if self.feedback is None:
            self.feedback = self.init_feedback(outs, logits.shape[1])
        if self.use_tangents and self.feedback_timing == "after":
            self.learn_feedback(y_dot, tangents)
        # The output error e = ∂L/∂y (autograd on the loss only, so any loss_fn works).
        leaf = logits.detach().requires_grad_()
        with torch.enable_grad():
            loss = self.loss_fn(leaf, y)
            (e,) = torch.autograd.grad(loss, leaf)
        signals = [(e @ b).view_as(o) for b, o in zip(self.feedback, outs)]  # new tensors: B may change below
        if self.use_tangents and self.feedback_timing == "before":
            self.learn_feedback(y_dot, tangents)
        if self.fast is not None:
            with torch.no_grad():
                for block, s in zip(self.fast, signals):
                    block.backward(s)
                lin = self.output[0]  # the output layer's exact gradient
                _set_grad(lin.weight, e.t() @ self._last_hidden)
                if lin.bias is not None:
                    _set_grad(lin.bias, e.sum(0))
            self._last_hidden = None
        else:
            params = self.trainable()
            # Every block's input was detached, so this one call runs one independent local backward per block.
            grads = torch.autograd.grad([logits, *outs], params, [e, *signals], allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = torch.zeros_like(p) if g is None else g
        return StepResult(loss.detach(), logits.detach())

    def state_dict(self) -> dict[str, Any]:
        fb = None if self.feedback is None else [b.clone() for b in self.feedback]
        return {**super().state_dict(), "feedback": fb}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        device = next(self.model.parameters()).device
        self.feedback = None if state["feedback"] is None else [b.to(device) for b in state["feedback"]]


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

    def __init__(self, model: nn.Module, seed: int = 0, feedback_init: str = "kaiming-uniform", **options: Any):
        if feedback_init not in FEEDBACK_INITS:
            raise UsageError(f"dfa: --feedback-init must be one of {', '.join(FEEDBACK_INITS)}, got {feedback_init!r}")
        super().__init__(model, seed=seed, feedback_init=feedback_init, **options)
        self.feedback_init = feedback_init

    def init_feedback(self, outs: list[torch.Tensor], classes: int) -> list[torch.Tensor]:
        return [dfa_feedback(classes, o, self.feedback_init, self.generator) for o in outs]


FEEDBACK_OPTIMIZERS = ("average", "adam", "sgd")
FEEDBACK_TIMINGS = ("before", "after")


@METHODS.register(
    "fdfa",
    "directional DFA: DFA whose feedback matrices track the output Jacobians, learned by one forward-mode pass",
    options={
        "feedback_lr": Option(1e-2, "rate of B: moving-average λ, or the feedback optimizer's learning rate"),
        "feedback_optimizer": Option(
            "average",
            "how B learns: average = B ← (1−λ)B + λ·mean(ẏuᵀ); adam / sgd = that optimizer on ½‖B − mean(ẏuᵀ)‖²",
            choices=FEEDBACK_OPTIMIZERS,
        ),
        "tangent_dist": Option(
            "normal", "tangent entries: normal (the paper's) or rademacher (±1: lower variance, cheaper to draw)",
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

    def __init__(
        self, model: nn.Module, seed: int = 0, feedback_lr: float = 1e-2, feedback_optimizer: str = "average",
        tangent_dist: str = "normal", feedback_timing: str = "before", **options: Any,
    ):  # fmt: skip
        if feedback_optimizer not in FEEDBACK_OPTIMIZERS:
            raise UsageError(f"fdfa: --feedback-optimizer must be one of {', '.join(FEEDBACK_OPTIMIZERS)}")
        if feedback_timing not in FEEDBACK_TIMINGS:
            raise UsageError(f"fdfa: --feedback-timing must be one of {', '.join(FEEDBACK_TIMINGS)}")
        if not 0.0 < feedback_lr <= (1.0 if feedback_optimizer == "average" else float("inf")):
            raise UsageError(
                f"fdfa: --feedback-lr must be in (0, 1] for the moving average, > 0 for an optimizer; got {feedback_lr}"
            )
        T.check_options(1, "mean", tangent_dist)
        super().__init__(
            model, seed=seed, feedback_lr=feedback_lr, feedback_optimizer=feedback_optimizer,
            tangent_dist=tangent_dist, feedback_timing=feedback_timing, **options,
        )  # fmt: skip
        self.feedback_lr, self.feedback_optimizer, self.tangent_dist = feedback_lr, feedback_optimizer, tangent_dist
        self.feedback_timing = feedback_timing
        self.optimizer: torch.optim.Optimizer | None = None

    def init_feedback(self, outs: list[torch.Tensor], classes: int) -> list[torch.Tensor]:
        return [torch.zeros(classes, o[0].numel(), device=o.device, dtype=o.dtype) for o in outs]

    def _make_optimizer(self) -> None:
        assert self.feedback is not None
        if self.feedback_optimizer == "adam":
            self.optimizer = torch.optim.Adam(self.feedback, lr=self.feedback_lr)
        elif self.feedback_optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.feedback, lr=self.feedback_lr)

    def learn_feedback(self, y_dot: torch.Tensor, tangents: list[torch.Tensor]) -> None:
        lam, n = self.feedback_lr, y_dot.shape[0]
        assert self.feedback is not None
        with torch.no_grad():
            if self.feedback_optimizer == "average":
                for b, u in zip(self.feedback, tangents):
                    # B ← (1−λ)B + λ·mean_batch(ẏ uᵀ), in place as one addmm.
                    b.mul_(1 - lam).addmm_(y_dot.t(), u.reshape(n, -1), alpha=lam / n)
                return
            if self.optimizer is None:
                self._make_optimizer()
            assert self.optimizer is not None
            for b, u in zip(self.feedback, tangents):
                b.grad = torch.addmm(b, y_dot.t(), u.reshape(n, -1), alpha=-1 / n)  # ∇ ½‖B − mean(ẏuᵀ)‖²
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        opt = None if self.optimizer is None else self.optimizer.state_dict()
        return {**super().state_dict(), "feedback_optimizer": opt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.optimizer = None
        if state.get("feedback_optimizer") is not None:
            self._make_optimizer()  # over the loaded B, then its moments and step counts
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["feedback_optimizer"])
