"""Attention whose projections rules can reach (`bpfree.core.attention`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bpfree.core.attention import attention_forward


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", [None, "bool", "float"])
def test_attention_forward_matches_multihead_attention(batch_first: bool, masks: str | None) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=6 if masks else None).double()
    q = torch.randn(3, 5, 8, dtype=torch.float64)
    k = torch.randn(3, 4, 6 if masks else 8, dtype=torch.float64)
    v = torch.randn(3, 4, 8, dtype=torch.float64)
    if not masks:
        k, v = q, q
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    opts = {}
    if masks:
        pad = torch.tensor([[False] * 3 + [True]] * 3)
        attn = torch.tensor([[False, True, False, False]] * 5)  # with the padding: keys 0 and 2 remain
        if masks == "float":
            pad, attn = pad.double() * -1e9, attn.double() * -3.0
        opts = {"key_padding_mask": pad, "attn_mask": attn}
    for need in (True, False):
        ref, w_ref = mha(q, k, v, need_weights=need, **opts)
        got, w_got = attention_forward(mha, q, k, v, need_weights=need, **opts)
        torch.testing.assert_close(got, ref)
        if need:
            torch.testing.assert_close(w_got, w_ref)
