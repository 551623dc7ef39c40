"""fg-w / fg-a on a small Vision Transformer (nn.TransformerEncoder): unbiased against torch.autograd."""

from __future__ import annotations

import math

import pytest
import torch
from test_anatomy import TinyViT
from test_forward_gradient import _estimate, _exact

from bpfree.methods import build

torch.set_num_threads(1)


def tiny_vit() -> TinyViT:
    torch.manual_seed(0)
    model = TinyViT(num_classes=3, input_shape=(1, 8, 8), dim=8).double()
    with torch.no_grad():  # a non-zero position embedding (its gradient goes through the whole encoder)
        model.pos.normal_(0, 0.3)
    model.input_shape = (1, 8, 8)
    return model


@pytest.mark.parametrize("method", ["fg-w", "fg-a"])
def test_unbiased_on_a_vit(method: str) -> None:
    """As test_forward_gradient.test_unbiased: the mean of M estimates is within its standard error of the exact
    gradient (chi-square over all coordinates); attention projections, norms and the position embedding included."""
    model = tiny_vit()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    exact = _exact(model, x, y)
    # Weight perturbation's variance grows with the parameter count: more tangents keep the test able to fail.
    K = 64 if method == "fg-w" else 8
    est = build(method, model, seed=3, tangents=K, tangent_dist="rademacher", exact_readout=False)
    M = 60
    samples = torch.stack([_estimate(est, x, y) for _ in range(M)])
    mean, var = samples.mean(0), samples.var(0)
    known = var < 1e-20
    assert torch.allclose(mean[known], exact[known], atol=1e-12)
    assert int((~known).sum()) > 0.9 * exact.numel()  # nearly every parameter is estimated, none skipped
    n = int((~known).sum())
    S = float(((mean - exact)[~known] ** 2 / (var[~known] / M)).sum())
    assert S < n + 6 * math.sqrt(2 * n), (S, n)
    S_bad = float(((2 * mean - exact)[~known] ** 2 / (4 * var[~known] / M)).sum())
    assert S_bad > n + 6 * math.sqrt(2 * n)


@pytest.mark.parametrize("method", ["fg-w", "fg-a"])
def test_a_diverged_model_is_not_a_readout_error(method: str) -> None:
    """NaN logits are the trainer's to report as divergence, not an exact-readout mismatch."""
    model = tiny_vit()
    with torch.no_grad():
        model.patch.weight.fill_(float("nan"))
    est = build(method, model, seed=0)
    result = est.step(torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1]))
    assert torch.isnan(result.loss)
