"""LocalMixer's hand-written feedback paths: `fa`, `dfa` and `bp --objective contrastive` (Ren et al. 2022).

The LocalMixer's grouped linear is a raw parameter (no nn.Linear), and the paper's DFA row treats every unit
(linear -> LN -> [+residual] -> ReLU) as its own DFA layer, finer than the model's blocks; so these rules run the
model's units by hand. `mixer_feedback` and `mixer_linear_hook` also give LocalMixer's fast paths of the local FA
rules (l-fa, lg-fa: `LocalBP` / `LocalGroupBP` of `bpfree.fastpaths.localmixer_local` with random feedback; the
generic rules are `bpfree.methods.block_local`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bpfree.core.anatomy import uniform_like
from bpfree.core.errors import UsageError
from bpfree.fastpaths.localmixer_local import LocalBP, LocalGroupBP, contrastive_backprop_step
from bpfree.methods import register_fast_path
from bpfree.methods.base import Buffers, StepResult
from bpfree.methods.bp import Backprop
from bpfree.methods.feedback_alignment import (
    DirectFeedbackAlignment,
    FeedbackAlignment,
    _FALinear,
)
from bpfree.models.localmixer import LinearHook, LocalMixer, MixerBlock, layer_norm, unit_params, unit_weight_grads


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


def mixer_feedback(
    model: LocalMixer, generator: torch.Generator, heads: bool, readout: bool
) -> dict[str, torch.Tensor]:
    """Feedback matrices for a LocalMixer's linear maps, keyed by their weights' parameter names."""
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        if block.token_mix is not None:
            out[f"blocks.{i}.token_mix.weight"] = uniform_like(block.token_mix.weight, model.patches, generator)
        out[f"blocks.{i}.channel.weight"] = uniform_like(block.channel.weight, block.channel.in_features, generator)
        out[f"blocks.{i}.group_weight"] = uniform_like(block.group_weight, block.group_weight.shape[-1], generator)
    for i, head in enumerate(model.heads if heads else []):
        out[f"heads.{i}.weight"] = uniform_like(head.weight, head.in_features, generator)
    if readout:
        out["readout.weight"] = uniform_like(model.readout.weight, model.readout.in_features, generator)
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


@register_fast_path("bp", LocalMixer)
class MixerBackprop(Backprop):
    """`bp`, plus the contrastive objective (SimCLR on the last block's projection head, the BP row of Table 4)."""

    contrastive_objective = True

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        assert isinstance(model, LocalMixer)
        if options.get("objective") == "contrastive" and model.head_dim == model.num_classes:
            raise UsageError("bp --objective contrastive needs a localmixer-* model with --head-dim 128")
        super().__init__(model, seed, **options)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if self.contrastive:
            return contrastive_backprop_step(self.model, x, y, self.generator, self.temperature)  # type: ignore[arg-type]
        return super().step(x, y)


@register_fast_path("fa", LocalMixer)
class MixerFA(FeedbackAlignment):
    """The paper's "FA" row: every linear map of every block and the readout get a B (keyed by parameter name);
    the global loss trains the blocks end to end, the local heads take no part (zero gradient), as under `bp`."""

    acts_on_layer_calls = False  # LocalMixer's functional token mixing is written out here

    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        assert isinstance(model, LocalMixer)
        Backprop.__init__(self, model, seed=seed, **options)
        self.feedback = self.parts.feedback = Buffers(mixer_feedback(model, self.generator, heads=False, readout=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """tokens -> blocks -> pooled -> LN -> readout, as the model's forward, with B in every backward."""
        model = self.model
        assert isinstance(model, LocalMixer)
        h = model.tokens(x)
        for i, block in enumerate(model.blocks):
            h = block(h, mixer_linear_hook(i, block, self.feedback))
        ro = model.readout
        return _FALinear.apply(layer_norm(model.pooled(h)), ro.weight, ro.bias, self.feedback["readout.weight"])


@register_fast_path("dfa", LocalMixer)
class MixerDFA(DirectFeedbackAlignment):
    """DFA on a LocalMixer: every unit (linear -> LN -> [+residual] -> ReLU) of every block is a DFA layer.
    Its signal e·B_l [B, P, C] at the unit output goes through that unit's ReLU, LN and linear only; the readout
    takes its exact gradient, the local heads none (zero)."""

    def _setup(self) -> None:
        assert isinstance(self.model, LocalMixer)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
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


# ----------------------------------------------------------------------------------------------------------------
# L-FA, LG-FA: the local-loss estimators (l-bp, lg-bp) with every linear's backward through a fixed random B.


class _LocalFeedback:
    """Mixin over LocalBP / LocalGroupBP. Every linear map between a local loss and the weights it trains sends
    its error back through a fixed random B (`anatomy.uniform_like`: U(±1/√fan_in), as `fa`): the three unit linears
    of each block and the local head's linear, so no weight is transported anywhere. Each weight's own gradient
    stays local and exact given the signal at its output (for a head: its exact local gradient). The readout sits
    on stopped features and passes no signal down, so it takes its exact gradient with no B, as in local.py.
    """

    model: LocalMixer
    generator: torch.Generator

    def _init_feedback(self) -> None:
        self.feedback = self.parts.feedback = Buffers(  # type: ignore[attr-defined]
            mixer_feedback(self.model, self.generator, heads=True, readout=False))

    def head(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        h = self.model.heads[i]
        return _FALinear.apply(feats, h.weight, h.bias, self.feedback[f"heads.{i}.weight"])


@register_fast_path("l-fa", LocalMixer)
class LocalFA(_LocalFeedback, LocalBP):
    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        self._init_feedback()

    def block_forward(self, i: int, block: MixerBlock, x: torch.Tensor) -> torch.Tensor:
        return block(x, mixer_linear_hook(i, block, self.feedback))


@register_fast_path("lg-fa", LocalMixer)
class LocalGroupFA(_LocalFeedback, LocalGroupBP):
    def __init__(self, model: nn.Module, seed: int = 0, **options: Any):
        super().__init__(model, seed, **options)
        self._init_feedback()

    def block_forward(self, i: int, block: MixerBlock, x: torch.Tensor) -> torch.Tensor:
        return block(x, mixer_linear_hook(i, block, self.feedback))
