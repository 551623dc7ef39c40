"""Forward gradients vs the exact gradient from torch.autograd (tiny float64 models, fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core import tangents as T
from bpfree.core.errors import UsageError
from bpfree.methods import build
from bpfree.methods.forward_gradient import ForwardGradientActivity


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


def _projection(V: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Projection of g onto the row space of V (rank-aware: rademacher rows can coincide)."""
    U, S, _ = torch.linalg.svd(V.T, full_matrices=False)
    U = U[:, S > 1e-9 * S.max()]
    return U @ (U.T @ g)


@pytest.mark.parametrize("K", [1, 3, 12, 30])
def test_tangents_orthogonal_is_projection(K: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 12
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    V = T.sample((K, n), "normal", gen, dtype=torch.float64)
    (est,) = T.aggregate(V, V @ g, "orthogonal")
    expect = _projection(V, g)
    if K >= n:
        assert torch.allclose(expect, g)
    assert torch.allclose(est, expect, atol=1e-10)
    # list of per-parameter tensors == one flat tensor
    parts = T.aggregate([V[:, :5].reshape(K, 5, 1), V[:, 5:]], V @ g, "orthogonal")
    assert torch.allclose(torch.cat([parts[0].flatten(), parts[1]]), est, atol=1e-10)


def test_tangents_per_example_and_scaling() -> None:
    gen = torch.Generator().manual_seed(0)
    K, B, n = 3, 4, 7
    V = T.sample((K, B, n), "rademacher", gen, dtype=torch.float64)
    g = torch.randn(B, n, generator=gen, dtype=torch.float64)
    d = torch.einsum("kbn,bn->kb", V, g)
    (orth,) = T.aggregate(V, d, "orthogonal")
    for b in range(B):
        assert torch.allclose(orth[b], _projection(V[:, b], g[b]), atol=1e-10)
    (s,) = T.aggregate(V, d, "sum")
    (m,) = T.aggregate(V, d, "mean")
    assert torch.allclose(s, K * m)
    assert torch.allclose(s, torch.einsum("kb,kbn->bn", d, V))


def test_rademacher_sampling() -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in [(3,), (5, 7), (64, 8), (1, 1)]:  # sizes that are and are not multiples of 8
        v = T.sample(shape, "rademacher", gen)
        assert v.shape == shape and set(v.unique().tolist()) <= {-1.0, 1.0}
    v = T.sample((4000, 30), "rademacher", gen)
    # every bit position balanced (bias would show as a nonzero mean in some column) and uncorrelated
    assert v.mean(0).abs().max() < 5 / math.sqrt(4000)
    off = v.T @ v / 4000 - torch.eye(30)
    assert off.abs().max() < 5 / math.sqrt(4000)
    with pytest.raises(UsageError):
        T.sample((3,), "uniform", gen)


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


def test_gram_of_integer_entries_matches_float64_bit_for_bit() -> None:
    """Rademacher tangents (some entries masked to 0): the float32 Gram route equals the float64 one exactly."""
    gen = torch.Generator().manual_seed(0)
    V = [T.sample((5, 40, 30), "rademacher", gen), T.sample((5, 7), "rademacher", gen)]
    V[0][:, :, :4] = 0
    assert torch.equal(T.gram(V, entries="integer"), T.gram([v.double() for v in V]))
    U = T.sample((5, 3, 50), "rademacher", gen) * (torch.rand(3, 50, generator=gen) > 0.5)
    assert torch.equal(T.gram(U, True, "integer"), T.gram(U.double(), True))
    # unmasked signs: the histogram route (K <= 16) and the matmul route (K > 16) equal float64
    for K in (2, 16, 17):
        W = [T.sample((K, 33, 9), "rademacher", gen), T.sample((K, 5), "rademacher", gen)]
        assert torch.equal(T.gram(W, entries="sign"), T.gram([w.double() for w in W]))
        assert torch.equal(T.gram([w.double() for w in W], entries="sign"), T.gram([w.double() for w in W]))


@pytest.mark.parametrize("dist", ["normal", "rademacher"])
def test_orthogonal_projection_is_stable_for_nearly_dependent_tangents(dist: str) -> None:
    """Float32 tangents, the last one nearly equal to the first. Normal: the Gram matrix's condition number is ~4e8,
    beyond float32; the projection still agrees with a float64 reference built from the same float32 tangents and
    directional derivatives, a float32 Gram inverse does not. Rademacher (two of 4000 signs flipped): the small
    eigenvalue is kept, not cut as rank deficiency, and the integer Gram route agrees with the reference."""
    gen = torch.Generator().manual_seed(0)
    K, n = 6, 4000
    V = T.sample((K, n), dist, gen)
    if dist == "normal":
        V[-1] = V[0] + 1e-4 * T.sample((n,), "normal", gen)
    else:
        V[-1] = V[0]
        V[-1, :2] *= -1  # two of 4000 signs differ
    g = torch.randn(n, generator=gen)
    d = V @ g  # float32, as the estimators compute it
    (est,) = T.aggregate(V, d, "orthogonal", entries=T.entries(dist))
    V64 = V.double()
    ref = torch.linalg.solve(V64 @ V64.T, d.double()) @ V64
    rel = lambda a: float((a.double() - ref).norm() / ref.norm())  # noqa: E731
    assert rel(est) < 1e-3
    if dist == "normal":
        assert rel(torch.linalg.inv(V @ V.T) @ d @ V) > 1e-2  # the test can fail: float32 inverse is far off


def test_projection_solve_takes_the_pseudo_inverse_where_the_gram_is_singular() -> None:
    """Per-example Gram matrices in one batch: full rank (fast Cholesky route), K > dimension and a repeated
    tangent (singular: pseudo-inverse route). Every example's coefficients give the projection."""
    gen = torch.Generator().manual_seed(0)
    K = 4
    V = torch.zeros(K, 3, 6, dtype=torch.float64)
    V[:, 0] = torch.randn(K, 6, generator=gen, dtype=torch.float64)  # rank 4 in 6 dimensions
    V[:, 1, :3] = torch.randn(K, 3, generator=gen, dtype=torch.float64)  # 4 tangents in 3 dimensions
    V[:, 2] = torch.randn(K, 6, generator=gen, dtype=torch.float64)
    V[3, 2] = V[0, 2]  # a repeated tangent
    g = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    d = torch.einsum("kbn,bn->kb", V, g)
    (est,) = T.aggregate(V, d, "orthogonal")
    for b in range(3):
        assert torch.allclose(est[b], _projection(V[:, b], g[b]), atol=1e-10)
    assert torch.allclose(est[1, :3], g[1, :3]) and est[1, 3:].abs().max() == 0
