"""Tangent sampling and the sum / mean / orthogonal aggregation (`bpfree.core.tangents`)."""

from __future__ import annotations

import math

import pytest
import torch

from bpfree.core import tangents as T
from bpfree.core.errors import UsageError


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
