"""Lean forward-mode layers (`bpfree.core.forward_mode`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.mark.parametrize("train", [True, False])
def test_tangent_friendly_layers_change_nothing_but_speed(train: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values, forward-mode tangents, gradients and batch-norm statistics as with PyTorch's own modules."""
    import copy

    import torch.autograd.forward_ad as fwad

    from bpfree.core.forward_mode import tangent_friendly

    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding="same", dilation=2),
                      nn.Conv2d(4, 4, 3, stride=2, padding="valid"), nn.Flatten(2, 3), nn.Conv1d(4, 2, 3),
                      nn.BatchNorm1d(2)).double().train(train)  # fmt: skip
    from bpfree.core.forward_mode import _Conv

    calls = []
    forward = _Conv.forward
    monkeypatch.setattr(_Conv, "forward", staticmethod(lambda ctx, *args: calls.append(1) or forward(ctx, *args)))
    b = copy.deepcopy(a)
    x, t = torch.randn(5, 3, 7, 7, dtype=torch.float64), torch.randn(5, 3, 7, 7, dtype=torch.float64)
    with fwad.dual_level():
        pa, ta = fwad.unpack_dual(a(fwad.make_dual(x, t)))
    with fwad.dual_level(), tangent_friendly(b):
        pb, tb = fwad.unpack_dual(b(fwad.make_dual(x, t)))
    assert len(calls) == 4  # every convolution ran the cheaper Function, the "same"-padded one included
    torch.testing.assert_close(pb, pa)
    torch.testing.assert_close(tb, ta)
    for s, r in zip(b.buffers(), a.buffers()):
        torch.testing.assert_close(s, r)
    g = torch.randn_like(pa)
    for s, r in zip(torch.autograd.grad(pb, list(b.parameters()), g), torch.autograd.grad(pa, list(a.parameters()), g)):
        torch.testing.assert_close(s, r)
