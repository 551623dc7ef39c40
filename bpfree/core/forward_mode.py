"""Cheaper forward-mode AD through convolutions, batch norm and attention, for rules that push tangents through a
model.

PyTorch's forward-mode rule for a convolution runs three convolutions (the primal, the input tangent through W, and
the input through W's tangent, even when W has none), and its rule for training-mode batch norm is a chain of
elementwise ops. `tangent_friendly(model)` swaps, for a while, every zero-padded Conv1d/Conv2d and every
BatchNorm1d/2d for an autograd Function with the same forward and backward (PyTorch's own kernels) and a `jvp` that
does only the work needed: one convolution of the input tangent (plus the weight's tangent, if it has one); for
batch norm the native backward kernel applied to the tangent (its Jacobian in the input is symmetric, so the VJP
kernel is also the JVP).

Attention: forward-mode AD has no rule for PyTorch's fused attention kernels, so those rules run the math kernel
(`bpfree.core.attention.math_attention`), whose graph keeps [batch, heads, L, S] matrices that the fused kernels do
not, and whose softmax makes a primal and a tangent of that size at every elementwise step. While `lean_attention()`
is active (`tangent_friendly` enters it), `F.scaled_dot_product_attention` without mask, dropout or causal hint runs
`_Attention`: the fused kernel forward and backward (its graph keeps q, k, v, the output and the log-sum-exp), and a
hand-written JVP over blocks of query rows, so that no matrix larger than about q is made at once, and without a
reverse graph (the tangent is not differentiable; no rule differentiates a tangent).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bpfree.core.anatomy import forwards_replaced

CONVS = (nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                conf: tuple) -> torch.Tensor:  # fmt: skip
        stride, padding, dilation, groups = conf
        ctx.set_materialize_grads(False)  # a weight without a tangent gives None in `jvp`, not zeros to convolve
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.conf, ctx.has_bias = conf, bias is not None
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None):
        if g is None:
            return None, None, None, None
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation, False,
            [0] * len(stride), groups, mask,
        )  # fmt: skip
        return gx, gw, gb, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor | None, w_t: torch.Tensor | None, b_t: torch.Tensor | None, _conf: Any):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        conv = F.conv1d if weight.dim() == 3 else F.conv2d
        out = None
        if x_t is not None:
            out = conv(x_t, weight, None, stride, padding, dilation, groups)
        # Sums in place into the fresh result: no batch-sized temporaries beyond the convolutions' own outputs.
        if w_t is not None:
            more = conv(x, w_t, None, stride, padding, dilation, groups)
            out = more if out is None else out.add_(more)
            del more
        if b_t is not None:
            shape = (1, -1) + (1,) * (weight.dim() - 2)
            out = b_t.view(shape) if out is None else out.add_(b_t.view(shape))
        return out


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running: tuple, training: bool, factor: float, eps: float,
                keep_stats: Callable[[tuple[torch.Tensor, torch.Tensor]], None] | None) -> torch.Tensor:  # fmt: skip
        mean_r, var_r = running
        ctx.set_materialize_grads(False)  # parameters without tangents give None in `jvp`
        out, mean, rstd = torch.native_batch_norm(x, weight, bias, mean_r, var_r, training, factor, eps)
        if keep_stats is not None and training:
            keep_stats((mean, rstd))
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)
        # Running statistics (eval mode) as they are now; the forward may update them in place afterwards.
        ctx.running = None if training else (mean_r.clone(), var_r.clone())
        ctx.training, ctx.eps, ctx.affine = training, eps, weight is not None
        return out

    @staticmethod
    def _backward(ctx: Any, g: torch.Tensor, mask: list[bool]) -> tuple:
        x, weight, mean, rstd = ctx.saved_tensors
        mean_r, var_r = ctx.running or (None, None)
        return torch.ops.aten.native_batch_norm_backward(
            g, x, weight, mean_r, var_r, mean, rstd, ctx.training, ctx.eps, mask
        )

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None):
        if g is None:
            return None, None, None, None, None, None, None, None
        affine = ctx.affine
        gx, gw, gb = _BatchNorm._backward(
            ctx, g.contiguous(), [ctx.needs_input_grad[0], affine and ctx.needs_input_grad[1],
                                  affine and ctx.needs_input_grad[2]]
        )  # fmt: skip
        return gx, gw, gb, None, None, None, None, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor | None, w_t: torch.Tensor | None, b_t: torch.Tensor | None, *_: Any):
        x, weight, mean, rstd = ctx.saved_tensors
        out = None
        if x_t is not None:  # the Jacobian in x is symmetric: its VJP kernel gives the JVP
            out = _BatchNorm._backward(ctx, x_t.contiguous(), [True, False, False])[0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if w_t is not None:
            # x̂·γ̇ = (x − μ)·(r·γ̇) per channel, accumulated in place a slice of the batch at a time: the temporary
            # (x − μ) is an eighth of the batch, not all of it.
            if ctx.training:
                centre, scale = mean, rstd * w_t
            else:
                mean_r, var_r = ctx.running
                centre, scale = mean_r, (var_r + ctx.eps).rsqrt() * w_t
            centre, scale = centre.view(shape), scale.view(shape)
            out = torch.zeros_like(x) if out is None else out
            step = -(-x.shape[0] // 8)
            for x_part, out_part in zip(x.split(step), out.split(step)):
                out_part.addcmul_(x_part - centre, scale)
        if b_t is not None:
            out = b_t.view(shape).expand_as(x) if out is None else out.add_(b_t.view(shape))
        return out


def layer_param_grads(
    module: nn.Module, inp: torch.Tensor, grad_out: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None = None
) -> list[torch.Tensor] | None:
    """The gradients of a Linear's / zero-padded Conv's / batch norm's trainable parameters (weight, then bias) from
    its input and the gradient at its output, without running the layer again (a batch norm's running statistics
    stay as they are); None for other modules. `stats`: a batch norm's batch mean and 1/std from its forward on
    `inp` (as `tangent_friendly(model, batch_stats)` records them); computed from `inp` when not given."""
    params = [p for p in (module.weight, module.bias) if p is not None and p.requires_grad] if isinstance(
        module, (nn.Linear, *CONVS, *NORMS)) else []  # fmt: skip
    if isinstance(module, NORMS):
        if module.weight is None:
            return []
        # Batch statistics exactly when nn.BatchNorm's forward uses them.
        batch_stats = module.training or (module.running_mean is None and module.running_var is None)
        dims = [0, *range(2, inp.dim())]
        mean, rstd = None, None
        if batch_stats and stats is not None:
            mean, rstd = stats
        elif batch_stats:  # slow on CPU (var_mean over dims 0, 2, ...): callers that ran the forward pass its stats
            var, mean = torch.var_mean(inp, dim=dims, correction=0)
            rstd = (var + module.eps).rsqrt()
        _, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(), inp, module.weight, module.running_mean, module.running_var, mean, rstd,
            batch_stats, module.eps, [False, True, True],
        )  # fmt: skip
        grads = {"weight": gw, "bias": gb}
    elif isinstance(module, nn.Linear):
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), inp.reshape(-1, inp.shape[-1])
        grads = {"weight": g2.t() @ x2, "bias": g2.sum(0)}
    elif isinstance(module, CONVS) and module.padding_mode == "zeros" and (conf := conv_config(module)) is not None:
        w = module.weight
        stride, padding, dilation, groups = conf
        _, gw, gb = torch.ops.aten.convolution_backward(
            grad_out, inp, w, [w.shape[0]] if module.bias is not None else None, stride, padding, dilation, False,
            [0] * (w.dim() - 2), groups, [False, True, module.bias is not None],
        )  # fmt: skip
        grads = {"weight": gw, "bias": gb}
    else:
        return None
    return [grads["weight"] if p is module.weight else grads["bias"] for p in params]


def conv_config(m: nn.Conv1d | nn.Conv2d) -> tuple | None:
    """(stride, padding, dilation, groups) with the padding explicit ("valid", and "same" for odd kernels at stride
    1, become numbers), as ATen's convolution kernels take them; None for a "same" they cannot express."""
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * len(m.kernel_size)
        elif all(k % 2 == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride):
            padding = tuple(d * (k - 1) // 2 for k, d in zip(m.kernel_size, m.dilation))
        else:
            return None
    return (list(m.stride), list(padding), list(m.dilation), m.groups)


def _conv_forward(m: nn.Conv1d | nn.Conv2d, conf: tuple, x: torch.Tensor) -> torch.Tensor:
    return _Conv.apply(x, m.weight, m.bias, conf)


def _norm_forward(m: nn.BatchNorm1d | nn.BatchNorm2d, batch_stats: dict | None, x: torch.Tensor) -> torch.Tensor:
    # nn.BatchNorm's own decisions: the update factor, batch statistics when training or without running ones.
    factor = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    training = m.training or (m.running_mean is None and m.running_var is None)
    keep = not m.training or m.track_running_stats
    running = (m.running_mean if keep else None, m.running_var if keep else None)
    record = None if batch_stats is None else partial(batch_stats.__setitem__, m)
    return _BatchNorm.apply(x, m.weight, m.bias, running, training, factor, m.eps, record)


@contextmanager
def tangent_friendly(model: nn.Module, batch_stats: dict | None = None) -> Iterator[None]:
    """While active, the model's convolutions and batch norms run the Functions above (same values, gradients
    and running statistics; cheaper forward-mode tangents). `batch_stats`, if given, maps each batch norm that
    normalised with batch statistics to the (mean, 1/std) of its latest forward."""
    swaps = []
    for m in model.modules():
        if "forward" in vars(m):
            continue  # already replaced (e.g. by feedback alignment): keep that
        if isinstance(m, CONVS) and m.padding_mode == "zeros" and (conf := conv_config(m)) is not None:
            swaps.append((m, partial(_conv_forward, m, conf)))
        elif isinstance(m, NORMS):
            swaps.append((m, partial(_norm_forward, m, batch_stats)))
    with forwards_replaced(swaps), lean_attention():
        yield


def renew_dual_level() -> None:
    """Close the current forward-AD level and open a fresh one, dropping every tangent made so far.

    A dual tensor whose primal has a reverse graph keeps its tangent (and what the tangent's graph saved) alive until
    its level closes, whoever still refers to it. A rule that hands only a primal across a block boundary renews the
    level there, so those tangents die with the block instead of piling up over the depth of the model.
    """
    fwad.exit_dual_level()
    fwad.enter_dual_level()


# PyTorch's default choice of attention kernels, restored inside `_Attention` (a surrounding `math_attention` allows
# only the math kernel, for the attention calls that do not come here).
_FUSED_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH]  # fmt: skip
_SDPA = F.scaled_dot_product_attention


class _Attention(torch.autograd.Function):
    """softmax(scale · q kᵀ) v over [batch, heads, L, E] inputs: PyTorch's kernel forward and backward, its JVP
    written out."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                keep_graph: bool) -> torch.Tensor:  # fmt: skip
        ctx.set_materialize_grads(False)  # inputs without tangents give None in `jvp`
        ctx.scale = q.shape[-1] ** -0.5 if scale is None else scale
        with sdpa_kernel(_FUSED_FIRST):
            if keep_graph:
                # The fused kernel's own graph, on detached aliases of the inputs (no copies): its backward is
                # PyTorch's, and it keeps what bp's keeps.
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_(needs) for t, needs in zip((q, k, v), ctx.needs_input_grad)]
                    inner = _SDPA(*leaves, scale=ctx.scale)
                ctx.inner = (inner, leaves)
                out = inner.detach()
            else:
                out = _SDPA(q, k, v, scale=ctx.scale)
        ctx.save_for_forward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None):
        # The inner graph goes with the first backward (its memory would otherwise stay until the outer graph dies),
        # so a second one, under retain_graph, cannot run: no rule asks for it.
        if not hasattr(ctx, "inner"):
            raise RuntimeError("lean attention: a second backward through the same graph is not supported")
        inner, leaves = ctx.inner
        del ctx.inner
        if g is None:
            return None, None, None, None, None
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(inner, wanted, g))
        return (*(next(grads) if t.requires_grad else None for t in leaves), None, None)

    @staticmethod
    def jvp(ctx: Any, q_t: torch.Tensor | None, k_t: torch.Tensor | None, v_t: torch.Tensor | None, *_: Any):
        # With P = softmax(S), S = s q kᵀ, O = P v:
        #   dS = s (dq kᵀ + q dkᵀ),  dO = P dv + (P ⊙ dS) v − rowsum(P ⊙ dS) ⊙ O.
        if q_t is None and k_t is None and v_t is None:
            return None
        # Without a reverse graph: the arithmetic below would otherwise record one through q, k and v, keeping
        # every block's [.., rows, S] matrices for as long as the tangent lives (nothing differentiates a tangent).
        with torch.no_grad():
            return _Attention._tangent(ctx, q_t, k_t, v_t)

    @staticmethod
    def _tangent(ctx: Any, q_t: torch.Tensor | None, k_t: torch.Tensor | None,
                 v_t: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        q, k, v, out = ctx.saved_tensors
        s, k_tr = ctx.scale, k.transpose(-2, -1)
        result = torch.empty_like(out)
        # Blocks of query rows whose [.., rows, S] matrices hold about as many numbers as q.
        length, keys = q.shape[-2], k.shape[-2]
        rows = max(1, length * q.shape[-1] // keys)
        for start in range(0, length, rows):
            block = slice(start, start + rows)
            scores = torch.matmul(q[..., block, :], k_tr).mul_(s)
            p = scores.softmax(-1)
            del scores
            o_t = result[..., block, :]
            if v_t is None:
                o_t.zero_()
            else:
                o_t.copy_(torch.matmul(p, v_t))
            if q_t is not None or k_t is not None:
                ds = None if q_t is None else torch.matmul(q_t[..., block, :], k_tr)
                if k_t is not None:
                    more = torch.matmul(q[..., block, :], k_t.transpose(-2, -1))
                    ds = more if ds is None else ds.add_(more)
                    del more
                w = ds.mul_(p).mul_(s)  # P ⊙ dS, over dS
                del p
                o_t.add_(torch.matmul(w, v)).addcmul_(w.sum(-1, keepdim=True), out[..., block, :], value=-1)
                del w
        return result


def lean_scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
) -> torch.Tensor:  # fmt: skip
    """`F.scaled_dot_product_attention`'s result; through `_Attention` where it applies, else PyTorch's own call."""
    qkv = (query, key, value)
    supported = (
        # A mask, causality or dropout would add terms to the JVP (and dropout would need its mask kept); grouped
        # heads would need k and v expanded. Functorch transforms (vmap, jvp) cannot run this kind of Function.
        attn_mask is None and dropout_p == 0.0 and not is_causal and not enable_gqa
        and not torch._C._are_functorch_transforms_active()
        and all(isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() for t in qkv)
        and query.dtype == key.dtype == value.dtype and query.device == key.device == value.device
        and query.shape[:2] == key.shape[:2] == value.shape[:2] and key.shape[-2] == value.shape[-2]
        and query.shape[-1] == key.shape[-1]
    )  # fmt: skip
    if not supported:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)  # fmt: skip
    keep_graph = torch.is_grad_enabled() and any(t.requires_grad for t in qkv)
    return _Attention.apply(query, key, value, scale, keep_graph)


_lean = threading.local()
_installs = {"count": 0, "previous": None}
_install_lock = threading.Lock()


def _sdpa_hook(*args: Any, **kwargs: Any) -> torch.Tensor:
    # Installed as F.scaled_dot_product_attention while some thread is inside `lean_attention`: only that thread's
    # calls take the lean path.
    if getattr(_lean, "depth", 0):
        return lean_scaled_dot_product_attention(*args, **kwargs)
    return _installs["previous"](*args, **kwargs)


@contextmanager
def lean_attention() -> Iterator[None]:
    """While active (in this thread), calls of `F.scaled_dot_product_attention`, nn.MultiheadAttention's included,
    run `lean_scaled_dot_product_attention`.

    The function is swapped in the `torch.nn.functional` module rather than caught by a TorchFunctionMode: a mode
    would put a Python call in front of every torch operation of the pass (several per cent of a small ViT's step).
    Code that bound the function under another name before (`from torch.nn.functional import ...`) keeps PyTorch's.
    """
    with _install_lock:
        if _installs["count"] == 0:
            _installs["previous"] = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _sdpa_hook
        _installs["count"] += 1
    _lean.depth = getattr(_lean, "depth", 0) + 1
    try:
        yield
    finally:
        _lean.depth -= 1
        with _install_lock:
            _installs["count"] -= 1
            if _installs["count"] == 0:
                F.scaled_dot_product_attention = _installs["previous"]
