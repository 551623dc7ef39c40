"""LocalMixer (Ren, Kornblith, Liao, Hinton 2022, "Scaling Forward Gradient With Local Losses", Table 2).

An MLP-Mixer-like network over non-overlapping patches, each patch flattened to one token, built so that many
small local losses can be attached: every block has its own head, and channels are split into groups.

- Block 0 (no token mixing, no residual): LN -> Linear(token_in -> C) -> LN -> ReLU -> groups -> LN ->
  grouped Linear (C/G -> C/G) -> LN -> ReLU.
- Blocks >= 1: LN -> token-mixing Linear across the P patches -> LN -> ReLU -> LN -> Linear(C -> C) -> LN -> ReLU
  -> groups -> LN -> grouped Linear -> LN -> + block input -> ReLU.
- LayerNorms have no affine parameters (per token over channels; per group where grouped).
- Local head per block: LN per token and channel group -> average-pool over patches -> Linear (to classes, or
  to a projection for the contrastive objective). Readout: average-pool -> LN over all channels -> Linear on the
  last block's features. Both as in the authors' code (its `inter_ln` and `last_layer_ln`, on in their config);
  see docs/localmixer.md.

`forward(x)` returns the readout logits with the gradient flowing through every block, so `bp` trains the
network end to end as an ordinary model (the local heads take no part and get zero gradient). The stop-gradient
in front of the readout is applied by the local methods (`bpfree.fastpaths.localmixer_local`), which train the
readout on detached features. `features(x)` gives every block's output, `trace` the cached intermediates that the
forward-gradient methods need.

Each block has three "units" (linear -> LN -> [+residual] -> ReLU); the forward-gradient methods perturb the
post-LN, pre-ReLU activity of every unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core.errors import UsageError
from bpfree.core.registry import Option
from bpfree.models import MODELS

EPS = 1e-5
#: (unit kind, input) -> the unit's linear map applied to the input; see `MixerBlock.forward`.
LinearHook = Callable[[str, torch.Tensor], torch.Tensor]


def layer_norm(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Non-affine LayerNorm over the last dim, separately per group of channels when groups > 1."""
    if groups == 1:
        return F.layer_norm(x, x.shape[-1:], eps=EPS)
    g = x.unflatten(-1, (groups, -1))
    return F.layer_norm(g, g.shape[-1:], eps=EPS).flatten(-2)


def _init_(weight: torch.Tensor, fan_in: int) -> None:
    # The paper's code: N(0, sigma^2) with sigma = min(2 / sqrt(fan_in), 0.1).
    with torch.no_grad():
        weight.normal_(0.0, min(2.0 / math.sqrt(fan_in), 0.1))


@dataclass
class LNCache:
    """What one non-affine LayerNorm needs to apply its Jacobian: input x, per-(group) mean and 1/std."""

    x: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    groups: int

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """J v for v [..., *x.shape] (J is symmetric, so this is both the JVP and the VJP).

        Uses ATen's fused LayerNorm-backward kernel, several times faster than the same formula in separate ops.
        """
        c = self.x.shape[-1] // self.groups
        xg = self.x.unflatten(-1, (self.groups, c))
        mean, rstd = self.mean, self.rstd
        lead = v.dim() - self.x.dim()
        if lead and v.shape[:lead].numel() == 1:  # one tangent: no copies
            return self.apply(v.reshape(self.x.shape)).reshape(v.shape)
        if lead:  # several tangents: fold them into the batch
            k = v.shape[:lead]
            xg = xg.expand(*k, *xg.shape).flatten(0, lead)
            mean = mean.expand(*k, *mean.shape).flatten(0, lead)
            rstd = rstd.expand(*k, *rstd.shape).flatten(0, lead)
            v = v.flatten(0, lead)
        out = torch.ops.aten.native_layer_norm_backward(
            v.unflatten(-1, (self.groups, c)), xg, [c], mean, rstd, None, None, [True, False, False]
        )[0].flatten(-2)
        return out.unflatten(0, (*k, -1)) if lead else out


def layer_norm_cached(x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, LNCache]:
    """Non-affine LayerNorm (per group) without autograd, returning (y, cache for its Jacobian)."""
    xg = x.unflatten(-1, (groups, -1))
    y, mean, rstd = torch.native_layer_norm(xg, xg.shape[-1:], None, None, EPS)
    return y.flatten(-2), LNCache(x, mean, rstd, groups)


@dataclass
class Unit:
    """Cached intermediates of one linear -> LN -> [+residual] -> ReLU unit (what forward gradients need).

    kind: "token" (mixes patches), "channel" (mixes all channels of a token) or "group" (grouped linear).
    inp: the linear's input [B, P, in]; ln: its post-linear LN (whose output is the perturbed activity);
    live: the ReLU derivative at the unit's output (float 0/1: sign of the ReLU output);
    nxt: the LN feeding the next unit (None for the last unit);
    pre: the LN that made `inp` from the block input (first unit only: what a tangent of the block input, in
    end-to-end forward gradients, passes through first).
    """

    kind: str
    inp: torch.Tensor
    ln: LNCache
    live: torch.Tensor
    nxt: LNCache | None = None
    pre: LNCache | None = None


class MixerBlock(nn.Module):
    def __init__(self, in_dim: int, channels: int, groups: int, patches: int, token_mixing: bool):
        super().__init__()
        if channels % groups:
            raise UsageError(f"channels ({channels}) must be divisible by groups ({groups})")
        self.groups = groups
        self.token_mix = nn.Linear(patches, patches) if token_mixing else None
        self.channel = nn.Linear(in_dim, channels)
        c = channels // groups
        self.group_weight = nn.Parameter(torch.empty(groups, c, c))  # [G, out, in]
        self.group_bias = nn.Parameter(torch.zeros(channels))
        for lin in (self.token_mix, self.channel):
            if lin is not None:
                _init_(lin.weight, lin.in_features)
                nn.init.zeros_(lin.bias)
        _init_(self.group_weight, c)

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        g = t.unflatten(-1, (self.groups, -1))
        return torch.einsum("...gi,goi->...go", g, self.group_weight).flatten(-2) + self.group_bias

    def mix_tokens(self, t: torch.Tensor) -> torch.Tensor:
        assert self.token_mix is not None
        return F.linear(t.transpose(-1, -2), self.token_mix.weight, self.token_mix.bias).transpose(-1, -2)

    def unit_linear(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        """The linear map of unit `kind` ("token", "channel" or "group") applied to t [B, P, in]."""
        if kind == "token":
            return self.mix_tokens(t)
        if kind == "channel":
            return self.channel(t)
        return self.grouped(t)

    def forward(self, x: torch.Tensor, linear: LinearHook | None = None) -> torch.Tensor:
        """The block; `linear(kind, t)` may replace the units' linear maps (feedback alignment swaps their
        backward), defaulting to `unit_linear`."""
        lin = linear or self.unit_linear
        h = x
        if self.token_mix is not None:
            h = F.relu(layer_norm(lin("token", layer_norm(x))))
        h = F.relu(layer_norm(lin("channel", layer_norm(h))))
        a = layer_norm(lin("group", layer_norm(h, self.groups)), self.groups)
        return F.relu(a + x) if self.token_mix is not None else F.relu(a)

    @torch.no_grad()
    def trace(self, x: torch.Tensor) -> tuple[torch.Tensor, list[Unit]]:
        """The forward pass without autograd, keeping each unit's intermediates; returns (output, units)."""
        units: list[Unit] = []
        t, pre = layer_norm_cached(x)
        if self.token_mix is not None:
            a, ln = layer_norm_cached(self.mix_tokens(t))
            h = F.relu(a)
            nt, nxt = layer_norm_cached(h)
            units.append(Unit("token", t, ln, torch.sign(h), nxt))
            t = nt
        a, ln = layer_norm_cached(self.channel(t))
        h = F.relu(a)
        nt, nxt = layer_norm_cached(h, self.groups)
        units.append(Unit("channel", t, ln, torch.sign(h), nxt))
        a, ln = layer_norm_cached(self.grouped(nt), self.groups)
        out = F.relu(a + x if self.token_mix is not None else a)
        units.append(Unit("group", nt, ln, torch.sign(out)))
        units[0].pre = pre
        return out, units


def unit_params(block: MixerBlock, kind: str) -> tuple[nn.Parameter, nn.Parameter]:
    if kind == "token":
        assert block.token_mix is not None
        return block.token_mix.weight, block.token_mix.bias
    if kind == "channel":
        return block.channel.weight, block.channel.bias
    return block.group_weight, block.group_bias


def unit_weight_grads(block: MixerBlock, unit: Unit, grad_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Push a gradient at the unit's post-LN activity back through that LN and linear only -> (dW, db)."""
    grad_s = unit.ln.apply(grad_a)
    if unit.kind == "token":
        return torch.einsum("bpc,bqc->pq", grad_s, unit.inp), grad_s.sum((0, 2))
    if unit.kind == "channel":
        return grad_s.flatten(0, 1).T @ unit.inp.flatten(0, 1), grad_s.sum((0, 1))
    gs, gi = grad_s.unflatten(-1, (block.groups, -1)), unit.inp.unflatten(-1, (block.groups, -1))
    return torch.einsum("bpgo,bpgi->goi", gs, gi), grad_s.sum((0, 1))


class LocalMixer(nn.Module):
    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...],
        blocks: int,
        grid: int,
        channels: int,
        groups: int,
        head_dim: int = 0,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise UsageError(f"localmixer needs image inputs (C, H, W), got shape {input_shape}")
        cin, height, width = input_shape
        if grid < 1 or height % grid or width % grid:
            raise UsageError(f"--grid {grid} must divide the image size {height}x{width}")
        if blocks < 1:
            raise UsageError("--blocks must be >= 1")
        self.grid, self.num_classes, self.channels, self.groups = grid, num_classes, channels, groups
        self.patches = grid * grid
        self.patch_h, self.patch_w = height // grid, width // grid
        token_in = cin * self.patch_h * self.patch_w
        self.head_dim = head_dim or num_classes
        self.blocks = nn.ModuleList(
            MixerBlock(token_in if i == 0 else channels, channels, groups, self.patches, token_mixing=i > 0)
            for i in range(blocks)
        )
        self.heads = nn.ModuleList(nn.Linear(channels, self.head_dim) for _ in range(blocks))
        for head in self.heads:
            _init_(head.weight, channels)
            nn.init.zeros_(head.bias)
        self.readout = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.readout.weight)  # zero-initialised readout, as in the paper's code
        nn.init.zeros_(self.readout.bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, P, C*ph*pw]: non-overlapping patches, each flattened to one token."""
        b, c = x.shape[:2]
        n, ph, pw = self.grid, self.patch_h, self.patch_w
        return x.reshape(b, c, n, ph, n, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c * ph * pw)

    @staticmethod
    def pooled(h: torch.Tensor) -> torch.Tensor:
        return h.mean(-2)

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """What every local head sees: block output [.., P, C] layer-normalised per token and channel group, then
        averaged over patches -> [.., C]. Normalising per (patch, group) slot keeps the slots apart, which the
        patch x group loss grid relies on (`bpfree.losses.grid`)."""
        return layer_norm(h, self.groups).mean(-2)

    def head(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        """Local head i's linear on its input features [.., C] (`head_input`)."""
        return self.heads[i](feats)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """The readout on pooled features: LN -> Linear."""
        return self.readout(layer_norm(pooled))

    def features(self, x: torch.Tensor, detach_between: bool = False) -> list[torch.Tensor]:
        """Every block's output [B, P, C]; with detach_between the input of each block is stop-gradient."""
        h = self.tokens(x)
        out = []
        for block in self.blocks:
            h = block(h.detach() if detach_between else h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.pooled(self.features(x)[-1]))


_OPTIONS = {
    "blocks": Option(1, "number of mixer blocks", minimum=1),
    "grid": Option(1, "patch grid side: the image is cut into grid x grid patches, one token each", minimum=1),
    "channels": Option(512, "channels per token", minimum=1),
    "groups": Option(16, "channel groups (grouped linear, group-wise local losses)", minimum=1),
    "head_dim": Option(0, "local head output size (0 = classes; 128 for the contrastive projection)", minimum=0),
}


def _register(
    name: str, description: str, blocks: int, grid: int, channels: int, groups: int, input_shape: tuple[int, ...]
) -> None:
    defaults = {"blocks": blocks, "grid": grid, "channels": channels, "groups": groups}
    options = {k: replace(o, default=defaults.get(k, o.default)) for k, o in _OPTIONS.items()}

    @MODELS.register(name, description, options=options, input_shape=input_shape)
    def build(num_classes: int, input_shape: tuple[int, ...], **opts: int) -> LocalMixer:
        return LocalMixer(num_classes, input_shape, **opts)


# Paper Table 2 (parameter counts include the local heads and the readout):
_register("localmixer-s1-1",
          "LocalMixer S/1/1: 1 block, whole image one token, 256 ch, 1 group (272K on MNIST)",
          1, 1, 256, 1, input_shape=(1, 28, 28))
_register("localmixer-m1-16",
          "LocalMixer M/1/16: 1 block, whole image one token, 512 ch, 16 groups (429K on MNIST)",
          1, 1, 512, 16, input_shape=(1, 28, 28))
_register("localmixer-m8-16",
          "LocalMixer M/8/16: 4 blocks, 8x8 patches, 512 ch, 16 groups (919K on CIFAR-10)",
          4, 8, 512, 16, input_shape=(3, 32, 32))
_register("localmixer-l8-64",
          "LocalMixer L/8/64: 4 blocks, 8x8 patches, 2048 ch, 64 groups (13.1M on CIFAR-10)",
          4, 8, 2048, 64, input_shape=(3, 32, 32))
_register("localmixer-l32-64",
          "LocalMixer L/32/64: 4 blocks, 32x32 patches (7 px on 224-px input), 2048 ch, 64 groups",
          4, 32, 2048, 64, input_shape=(3, 224, 224))
