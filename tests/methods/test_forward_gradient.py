"""Forward gradients vs the exact gradient from torch.autograd (tiny float64 models, fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core.errors import UsageError
from bpfree.methods import build
from bpfree.methods.forward_gradient import ForwardGradientActivity
from tests.user_models import TinyViT


def _mlp(act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 3)).double()


class _Conv(nn.Module):
    """Not a Linear chain: exercises the generic forward-mode path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _conv() -> nn.Module:
    torch.manual_seed(0)
    return _Conv().double()


def _data(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (5, 1, 3, 3) if isinstance(model, _Conv) else (5, 1, 2, 3)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)


def _exact(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def _estimate(est, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    est.model.zero_grad(set_to_none=True)
    est.step(x, y)
    return torch.cat([p.grad.flatten() for p in est.model.parameters()])


MODELS = {"mlp": _mlp, "mlp-tanh": lambda: _mlp(nn.Tanh), "conv": _conv}


UNBIASED_CASES = [
    ("mlp", "fg-w", "rademacher"),
    ("mlp", "fg-w", "normal"),
    ("mlp", "fg-a", "rademacher"),
    ("mlp", "fg-a", "normal"),
    ("mlp-tanh", "fg-w", "rademacher"),
    ("mlp-tanh", "fg-a", "normal"),
    ("conv", "fg-w", "normal"),
    ("conv", "fg-a", "rademacher"),
]


@pytest.mark.parametrize("model_name,method,dist", UNBIASED_CASES)
def test_unbiased(model_name: str, method: str, dist: str) -> None:
    """Mean of M independent estimates vs the exact gradient, tolerance from their sample variance.

    S = sum_i (mean_i - g_i)^2 / (var_i / M) is ~chi^2 with n degrees of freedom if unbiased; coordinates the
    estimator knows exactly (zero variance) must match to float precision.
    """
    model = MODELS[model_name]()
    x, y = _data(model)
    g = _exact(model, x, y)
    est = build(method, model, seed=3, tangents=8, tangent_dist=dist, exact_readout=False)
    M = 100
    samples = torch.stack([_estimate(est, x, y) for _ in range(M)])
    mean, var = samples.mean(0), samples.var(0)
    exact = var < 1e-20
    assert torch.allclose(mean[exact], g[exact], atol=1e-12)
    n = int((~exact).sum())
    S = float(((mean - g)[~exact] ** 2 / (var[~exact] / M)).sum())
    assert S < n + 6 * math.sqrt(2 * n), (S, n)
    # ...and the test can fail: a 2x mis-scaled estimator is far outside the band.
    S_bad = float(((2 * mean - g)[~exact] ** 2 / (4 * var[~exact] / M)).sum())
    assert S_bad > n + 6 * math.sqrt(2 * n)


@pytest.mark.parametrize("model_name", ["mlp", "conv"])
@pytest.mark.parametrize("readout", [True, False])
def test_orthogonal_full_rank_is_exact(model_name: str, readout: bool) -> None:
    model = MODELS[model_name]()
    x, y = _data(model)
    g = _exact(model, x, y)
    n = sum(p.numel() for p in model.parameters())
    for K in (n, 2 * n):  # K = dimension, and K > dimension (singular Gram matrix)
        est = build("fg-w", model, seed=0, tangents=K, aggregation="orthogonal", exact_readout=readout)
        assert torch.allclose(_estimate(est, x, y), g, atol=1e-9)
    # fg-a: per example, the activity space has (hidden + output) dimensions; K above that is exact too.
    est = build("fg-a", model, seed=0, tangents=40, aggregation="orthogonal", exact_readout=readout)
    assert torch.allclose(_estimate(est, x, y), g, atol=1e-9)


@pytest.mark.parametrize("method", ["fg-w", "fg-a"])
@pytest.mark.parametrize("model_name", ["mlp", "conv"])
def test_sum_is_K_times_mean(method: str, model_name: str) -> None:
    model = MODELS[model_name]()
    x, y = _data(model)
    K = 5
    s = _estimate(build(method, model, seed=7, tangents=K, aggregation="sum"), x, y)
    m = _estimate(build(method, model, seed=7, tangents=K, aggregation="mean"), x, y)
    # the exactly-trained readout is not scaled; every perturbed coordinate is
    ro = sum(p.numel() for p in list(model.parameters())[-2:])
    assert torch.allclose(s[:-ro], K * m[:-ro], rtol=1e-10, atol=1e-14)
    assert torch.allclose(s[-ro:], m[-ro:])
    assert not torch.allclose(s, m)


@pytest.mark.parametrize("aggregation", ["mean", "orthogonal"])
@pytest.mark.parametrize("dist", ["rademacher", "normal"])
def test_recompute_gives_identical_estimates(aggregation: str, dist: str) -> None:
    model = _mlp()
    x, y = _data(model)
    kw = dict(tangents=3, aggregation=aggregation, tangent_dist=dist)
    a = _estimate(build("fg-a", model, seed=5, recompute=False, **kw), x, y)
    b = _estimate(build("fg-a", model, seed=5, recompute=True, **kw), x, y)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_fast_path_matches_generic_path() -> None:
    """Same seed, same tangent draws: the fused Linear-chain path equals the torch.func/forward_ad path."""
    model = _mlp()
    x, y = _data(model)
    for method in ("fg-w", "fg-a"):
        for agg in ("mean", "orthogonal"):
            fast = build(method, model, seed=2, tangents=1 if method == "fg-w" else 3, aggregation=agg)
            slow = build(method, model, seed=2, tangents=1 if method == "fg-w" else 3, aggregation=agg)
            slow.chain = None
            a, b = _estimate(fast, x, y), _estimate(slow, x, y)
            if method == "fg-a":  # the fast path masks by the ReLU derivative, the generic one cannot
                assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.5
            else:
                assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_checkpoint_restores_tangent_sequence() -> None:
    model = _mlp()
    x, y = _data(model)
    est = build("fg-a", model, seed=9, tangents=2)
    state = est.state_dict()
    a = _estimate(est, x, y)
    est.load_state_dict(state)
    assert torch.equal(a, _estimate(est, x, y))
    assert not torch.equal(a, _estimate(est, x, y))  # and the next step draws new tangents


def test_step_result_and_float32_defaults() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(6, 1, 2, 2), torch.randint(0, 3, (6,))
    for method in ("fg-w", "fg-a"):
        r = build(method, model).step(x, y)
        assert r.logits.shape == (6, 3) and r.loss.dim() == 0
        assert torch.allclose(r.logits, model(x).detach())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "options",
    [
        {"tangents": 0},
        {"aggregation": "median"},
        {"tangent_dist": "uniform"},
        {"tangents": "x"},
        {"bogus": 1},
    ],
)
def test_bad_options_raise_usage_error(options: dict) -> None:
    with pytest.raises(UsageError):
        build("fg-a", _mlp(), **options)
    with pytest.raises(UsageError):
        ForwardGradientActivity(_mlp(), tangents=-1)


# ------------------------------------------------------------------------------------------ bpfree.core.tangents


def test_batchnorm_generic_path() -> None:
    """fg-w through batch norm (training mode, batch statistics) is exact with full-rank orthogonal tangents."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()
    x, y = torch.randn(6, 1, 3, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    g = _exact(model, x, y)
    n = sum(p.numel() for p in model.parameters())
    est = build("fg-w", model, tangents=n, aggregation="orthogonal", exact_readout=False)
    assert torch.allclose(_estimate(est, x, y), g, atol=1e-9)
    with pytest.raises(UsageError):
        build("fg-a", model, tangents=2).step(x, y)


# ------------------------------------------------------------------ on a small ViT (nn.TransformerEncoder)


def tiny_vit() -> TinyViT:
    torch.manual_seed(0)
    model = TinyViT(num_classes=3, input_shape=(1, 8, 8), dim=8).double()
    with torch.no_grad():  # a non-zero position embedding (its gradient goes through the whole encoder)
        model.pos.normal_(0, 0.3)
    model.input_shape = (1, 8, 8)
    return model


@pytest.mark.parametrize("method", ["fg-w", "fg-a"])
def test_unbiased_on_a_vit(method: str) -> None:
    """As test_unbiased: the mean of M estimates is within its standard error of the exact
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


def test_fg_a_takes_batch_norm_statistics_from_its_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """fg-a forms a batch norm's parameter gradients with the mean and 1/std its forward computed (recorded by
    `tangent_friendly`), not by reducing the layer's input again, and they equal those from the input."""
    from bpfree.core import forward_mode
    from bpfree.core.forward_mode import layer_param_grads, tangent_friendly

    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).double()
    x, g = torch.randn(6, 3, 4, 5, dtype=torch.float64), torch.randn(6, 3, 4, 5, dtype=torch.float64)
    stats: dict = {}
    with torch.no_grad(), tangent_friendly(bn, stats):
        bn(x)
    assert set(stats) == {bn}
    for a, b in zip(layer_param_grads(bn, x, g, stats[bn]), layer_param_grads(bn, x, g)):
        torch.testing.assert_close(a, b)

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))  # fmt: skip
    est = build("fg-a", model, seed=0)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    want = est.step(x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    monkeypatch.setattr(forward_mode.torch, "var_mean", None)  # a second reduction would fail
    est = build("fg-a", model, seed=0)
    got = est.step(x, y)
    torch.testing.assert_close(got.loss, want.loss)
    for p, want_grad in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, want_grad)


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
