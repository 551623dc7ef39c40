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


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_parameter_gradients_without_a_second_forward(train: bool) -> None:
    """layer_param_grads on a batch norm: autograd's gradients of γ and β, batch or running statistics as the module
    itself would use, and the running statistics left untouched."""
    from bpfree.core.forward_mode import layer_param_grads

    torch.manual_seed(0)
    for bn in (torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(3)):
        bn = bn.double().train(train)
        with torch.no_grad():
            bn.weight.normal_(), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
        x = torch.randn(6, 3, 4, 5, dtype=torch.float64)[..., 0] if isinstance(bn, torch.nn.BatchNorm1d) \
            else torch.randn(6, 3, 4, 5, dtype=torch.float64)  # fmt: skip
        g = torch.randn_like(x)
        before = [b.clone() for b in bn.buffers()]
        got = layer_param_grads(bn, x, g)
        for b, b0 in zip(bn.buffers(), before):
            torch.testing.assert_close(b, b0)
        want = torch.autograd.grad(bn(x), [bn.weight, bn.bias], g)
        assert got is not None and len(got) == 2
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_fg_a_updates_running_statistics_once_per_step() -> None:
    """A model whose batch norms and a custom normalising module keep running statistics: one fg-a step moves them
    exactly as one bp step does (the per-layer VJPs must not run the forward again)."""

    class Scaler(torch.nn.Module):  # a module the fast per-layer rules do not know, with its own buffer
        def __init__(self) -> None:
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(4))
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return x * self.gain.view(1, -1, 1, 1)

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), Scaler(), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))  # fmt: skip

    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    ref, model = make(), make()
    for m in (ref, model):
        m.input_shape = (3, 8, 8)
    build("bp", ref, seed=0).step(x, y)
    build("fg-a", model, seed=0).step(x, y)
    for (name, a), b in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, msg=name)
