"""nn.MultiheadAttention's forward written out, with its projections pluggable.

Rules that change what a linear map does (feedback alignment swaps its backward, activity perturbation adds tangents
to its output) cannot reach the projections inside `nn.MultiheadAttention`: its forward uses `in_proj_weight` and
`out_proj.weight` directly in one fused function. `attention_forward` computes the same maths (masks, batch_first,
dropout, averaged weights) with the three input projections going through `project` and the output projection
through the `out_proj` module (so its hooks and patched forwards apply), the attention itself through
`F.scaled_dot_product_attention`. `patched_attention` installs it on every attention module of a model for a while.

Forward-mode AD has no rule for the CPU flash-attention kernel, so `math_attention` selects the math kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from bpfree.anatomy import forwards_replaced
from bpfree.errors import UsageError

#: (attention module, "q" | "k" | "v", input [B, L, E], weight, bias) -> projected input
Project = Callable[[nn.MultiheadAttention, str, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def plain_projection(_mha: nn.MultiheadAttention, _which: str, x: torch.Tensor, w: torch.Tensor,
                     b: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    return F.linear(x, w, b)


def projection_weights(mha: nn.MultiheadAttention) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """The q, k, v projections' (weight, bias): slices of `in_proj_weight`, or the separate weights."""
    e = mha.embed_dim
    bias = mha.in_proj_bias
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight
        return {k: (w[i * e:(i + 1) * e], None if bias is None else bias[i * e:(i + 1) * e])
                for i, k in enumerate("qkv")}  # fmt: skip
    ws = {"q": mha.q_proj_weight, "k": mha.k_proj_weight, "v": mha.v_proj_weight}
    return {k: (ws[k], None if bias is None else bias[i * e:(i + 1) * e]) for i, k in enumerate("qkv")}


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = may not attend) as -inf / 0; a float mask as is."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def attention_forward(
    mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None, need_weights: bool = True, attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True, is_causal: bool = False, *, project: Project = plain_projection,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """`nn.MultiheadAttention.forward`'s result, the projections through `project` and `mha.out_proj`."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise UsageError("attention with add_bias_kv or add_zero_attn is not supported by this rule")
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if not mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    w = projection_weights(mha)
    if query is key and key is value and mha._qkv_same_embed_dim:
        # Self-attention: one matmul for q, k, v (the rule sees the in_proj as one map), split after.
        q, k, v = project(mha, "qkv", query, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    else:
        q, k, v = (project(mha, n, t, *w[n]) for n, t in (("q", query), ("k", key), ("v", value)))
    n, lq, e = q.shape
    h = mha.num_heads
    q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, L, E/H]
    mask = _additive(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(n, h, lq, -1) if mask.dim() == 3 else mask
    pad = _additive(key_padding_mask, q.dtype)
    if pad is not None:
        pad = pad.view(n, 1, 1, -1)
        mask = pad if mask is None else mask + pad
    causal = is_causal and mask is None  # as nn.MultiheadAttention: a given mask wins over the hint
    p = mha.dropout if mha.training else 0.0
    weights = None
    if need_weights:
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if causal:
            mask = torch.full((lq, k.shape[2]), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        if mask is not None:
            scores = scores + mask
        attn = scores.softmax(-1)
        weights = attn.mean(1) if average_attn_weights else attn
        out = F.dropout(attn, p) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
    out = mha.out_proj(out.transpose(1, 2).reshape(n, lq, e))
    if not mha.batch_first:
        out = out.transpose(0, 1)
    if not batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights


@contextmanager
def patched_attention(model: nn.Module, project: Project = plain_projection) -> Iterator[None]:
    """While active, every nn.MultiheadAttention in `model` runs `attention_forward` with `project`."""
    mods = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    with forwards_replaced([(m, partial(attention_forward, m, project=project)) for m in mods]):
        yield


@contextmanager
def math_attention() -> Iterator[None]:
    """Scaled-dot-product attention through the math kernel (forward-mode AD needs it on CPU)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield
