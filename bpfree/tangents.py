"""Tangents for forward gradients: sampling and multi-tangent aggregation (pure tensor code, no training).

Conventions (shared by every forward-gradient method):

* K tangents are stacked along a LEADING dimension. A weight-space tangent for a parameter of shape S is a
  tensor [K, *S]; an activity tangent, independent per example, is [K, B, *S].
* Directional derivatives `d` have shape [K] (one per tangent, shared over the batch: weight perturbation) or
  [K, B] (one per tangent and example: activity perturbation).
* An estimate is a linear combination of the tangents, estimate = sum_k c_k v_k. `coefficients` turns d into
  c for an aggregation, `combine` forms the sum; `aggregate` does both.

Aggregations (Flügel et al. 2024), V = tangents as columns, d = V^T g:
    sum         c = d                 estimate = V d
    mean        c = d / K             estimate = V d / K
    orthogonal  c = (V^T V)^+ d       estimate = V (V^T V)^+ V^T g = projection of g onto span(V)
The K x K Gram matrix is accumulated in float64 (for Rademacher tangents exactly, from float32 matmuls or a
histogram of sign patterns, see `gram`) and the system solved in float64 (Cholesky where it is certified to be
the same, else an eigenvalue pseudo-inverse): K larger than the space's dimension (a singular Gram matrix) still
gives exactly the projection instead of failing, and nearly dependent tangents keep float64's accuracy (a
float32 inverse loses it once the Gram's condition number nears 1/eps32).

Sampling: `rademacher` (+-1) is built from random BITS (one 64-bit draw gives 56 signs, expanded through a
256 x 8 lookup table), much cheaper than Gaussian draws (docs/performance.md, "Measured choices").
It also has lower estimator variance than Gaussian tangents (E[v^4] = 1, not 3), with the same E[v v^T] = I.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

from bpfree.errors import UsageError

DISTS = ("normal", "rademacher")
AGGREGATIONS = ("sum", "mean", "orthogonal")

# Eigenvalues of the float64 Gram matrix below this fraction of the largest, times the space's dimension,
# are treated as zero. Float32 tangents have exact float64 products, so the Gram's rounding error is about
# dim * eps64 * |G|; genuine small eigenvalues (K close to dim) are ~1/dim^2 relative, far above it.
_RTOL_PER_DIM = 16 * torch.finfo(torch.float64).eps

_LUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def check_options(tangents: int, aggregation: str, tangent_dist: str) -> None:
    """Raise UsageError for an impossible combination of the shared forward-gradient options."""
    if not isinstance(tangents, int) or tangents < 1:
        raise UsageError(f"option --tangents: must be a positive integer, got {tangents!r}")
    if aggregation not in AGGREGATIONS:
        raise UsageError(f"option --aggregation: {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")
    if tangent_dist not in DISTS:
        raise UsageError(f"option --tangent-dist: {tangent_dist!r} is not one of {', '.join(DISTS)}")


def read_options(options: dict[str, Any]) -> tuple[int, str, str]:
    """(tangents, aggregation, tangent distribution) from an estimator's options, defaults filled and checked."""
    tangents = int(options.get("tangents", 1))
    aggregation = options.get("aggregation", "mean")
    tangent_dist = options.get("tangent_dist", "rademacher")
    check_options(tangents, aggregation, tangent_dist)
    return tangents, aggregation, tangent_dist


def _sign_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8] table: row b holds the 8 bits of byte b as -1/+1."""
    key = (device, dtype)
    if key not in _LUTS:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _LUTS[key] = (bits * 2 - 1).to(device=device, dtype=dtype)
    return _LUTS[key]


def _rademacher_(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    n = out.numel()
    nbytes = (n + 7) // 8
    # int64 random_() fills [0, 2^63): the top bit is always 0, so use only the 7 low bytes of each word.
    words = torch.empty((nbytes + 6) // 7, dtype=torch.int64, device=out.device).random_(generator=generator)
    raw = words.view(torch.uint8).view(-1, 8)
    raw = raw[:, :7] if sys.byteorder == "little" else raw[:, 1:]
    idx = raw.reshape(-1)[:nbytes].to(torch.int32)
    lut = _sign_lut(out.device, out.dtype)
    if n % 8 == 0 and out.is_contiguous():
        torch.index_select(lut, 0, idx, out=out.view(-1, 8))  # write straight into the caller's buffer
    else:
        out.copy_(torch.index_select(lut, 0, idx).view(-1)[:n].view(out.shape))
    return out


def sample_(out: torch.Tensor, dist: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill `out` in place with i.i.d. tangent entries (mean 0, variance 1) and return it."""
    if dist == "normal":
        return out.normal_(generator=generator)
    if dist == "rademacher":
        return _rademacher_(out, generator)
    raise UsageError(f"option --tangent-dist: {dist!r} is not one of {', '.join(DISTS)}")


def sample(
    shape: Sequence[int],
    dist: str,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A new tensor of `shape` (put K first) with i.i.d. tangent entries."""
    return sample_(torch.empty(tuple(shape), device=device, dtype=dtype), dist, generator)


def _as_list(tangents: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [tangents] if isinstance(tangents, torch.Tensor) else list(tangents)


ENTRIES = ("real", "integer", "sign")

_SIGN_TABLES: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
_MAX_CODE_BITS = 16  # the sign-code route below keeps a 2^K-bin histogram: K <= 16


def entries(dist: str, masked: bool = False) -> str:
    """What `gram` may assume about tangents drawn from `dist` (masked: some entries multiplied by 0)."""
    if dist != "rademacher":
        return "real"
    return "integer" if masked else "sign"


def _sign_table(K: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """([2^K, K] table whose row c holds the signs 2 * bit_k(c) - 1, [K] code weights 2^(k-1))."""
    key = (K, device, dtype)
    if key not in _SIGN_TABLES:
        k = torch.arange(K, device=device)
        bits = (torch.arange(2**K, device=device).unsqueeze(1) >> k) & 1
        _SIGN_TABLES[key] = ((bits * 2 - 1).to(dtype), torch.pow(2.0, k).to(dtype) / 2)
    return _SIGN_TABLES[key]


def _sign_gram(part: torch.Tensor) -> torch.Tensor:
    """Gram matrix of K <= 16 sign vectors [K, m] (m < 2^24) from the histogram of their columns.

    Column j is one of 2^K sign patterns, coded as the integer sum_k 2^(k-1) (v_kj + 1): one [K] x [K, m] product,
    exact in float32. With counts h over the patterns S, G = S^T diag(h) S; the patterns are split into the low
    a = min(K, 8) and high b = K - a signs (h as a [2^b, 2^a] table H), so G's blocks are small products:
    S_a^T diag(H summed over rows) S_a, S_b^T diag(H summed over columns) S_b and S_b^T H S_a. About K
    multiply-adds per coordinate instead of K^2.
    """
    K = part.shape[0]
    a = min(K, 8)
    b = K - a
    S_a, weights = _sign_table(a, part.device, part.dtype)
    if b:
        S_b, w_b = _sign_table(b, part.device, part.dtype)
        weights = torch.cat([weights, w_b * 2**a])
    code = (weights @ part).add_((2**K - 1) / 2).to(torch.int32)  # int32: a far cheaper conversion than int64
    H = torch.bincount(code, minlength=2**K).to(part.dtype).view(2**b, 2**a)
    G = part.new_empty(K, K)
    G[:a, :a] = (S_a.T * H.sum(0)) @ S_a
    if b:
        G[a:, a:] = (S_b.T * H.sum(1)) @ S_b
        G[a:, :a] = S_b.T @ H @ S_a
        G[:a, a:] = G[a:, :a].T
    return G


def gram(
    tangents: torch.Tensor | Sequence[torch.Tensor],
    per_example: bool = False,
    entries: str = "real",
    chunk: int = 1 << 20,
) -> torch.Tensor:
    """Float64 Gram matrix of the tangents, summed over all given tensors.

    tangents [K, *S] -> [K, K]; with per_example=True, tangents [K, B, *S] -> [B, K, K] (one per example).

    `entries` says what the values are (see `entries()`): "real" -> columns converted to float64 in chunks (the
    copy never exceeds K * chunk (* B) numbers). "integer" (in {-1, 0, 1}: Rademacher, possibly masked) -> every
    product and partial sum is an integer, exact in float32 below 2^24, so chunks of up to 2^24 coordinates are
    reduced in the tangents' own float32/float64 (one matmul, no float64 copy) and only the K x K results summed
    in float64. "sign" (in {-1, 1}: Rademacher, unmasked) -> for K <= 16 a column histogram (`_sign_gram`), else
    as "integer". All three give the same float64 result, bit for bit, for such tangents.
    """
    if entries not in ENTRIES:
        raise ValueError(f"entries must be one of {ENTRIES}, got {entries!r}")
    G: torch.Tensor | None = None
    for t in _as_list(tangents):
        K = t.shape[0]
        exact = entries != "real" and t.dtype in (torch.float32, torch.float64)
        codes = exact and entries == "sign" and not per_example and 1 < K <= _MAX_CODE_BITS
        step = 1 << 24 if exact else chunk
        if per_example:
            B = t.shape[1]
            flat = t.reshape(K, B, -1).transpose(0, 1)  # [B, K, m]
            step = step if exact else max(1, chunk // max(1, B))
            for s in range(0, flat.shape[-1], step):
                part = flat[..., s : s + step] if exact else flat[..., s : s + step].double()
                g = torch.bmm(part, part.transpose(1, 2)).double()
                G = g if G is None else G + g
        else:
            flat = t.reshape(K, -1)
            for s in range(0, flat.shape[-1], step):
                part = flat[:, s : s + step] if exact else flat[:, s : s + step].double()
                g = (_sign_gram(part) if codes else part @ part.T).double()
                G = g if G is None else G + g
    if G is None:
        raise ValueError("gram() needs at least one tangent tensor")
    return G


def _solve_psd(G: torch.Tensor, rhs: torch.Tensor, dim: int | None) -> torch.Tensor:
    """G^+ rhs for float64 Gram matrices G [B, K, K] and right-hand sides rhs [B, K, R]."""
    rtol = _RTOL_PER_DIM * max(dim or 10**6, G.shape[-1])
    # Symmetrise: the two float64 triangles can differ in the last bit after chunked summation.
    Gs = 0.5 * (G + G.transpose(-1, -2))
    # Fast route, Cholesky: taken where it certifies that the pseudo-inverse would keep every eigenvalue, i.e. a
    # lower bound on the smallest, 1 / ||L^-1||_F^2, exceeds the cut-off rtol * trace (>= rtol * the largest).
    # There G^+ = G^-1. Elsewhere (rank deficient, K > dimension, or too close to it) the eigenvalue pseudo-inverse.
    L, info = torch.linalg.cholesky_ex(Gs)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device).expand_as(Gs)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    smallest = 1 / L_inv.square().sum((-1, -2))
    ok = (info == 0) & torch.isfinite(smallest) & (smallest > rtol * Gs.diagonal(dim1=-2, dim2=-1).sum(-1))
    c = torch.cholesky_solve(rhs, L)
    if not bool(ok.all()):
        bad = ~ok
        c[bad] = torch.linalg.pinv(Gs[bad], hermitian=True, rtol=rtol) @ rhs[bad]
    return c


def solve_projection(G: torch.Tensor, d: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """c = G^+ d in float64; returns d's shape and dtype.

    G [K, K] with d [K, *R] (one Gram matrix for every column of d), or G [B, K, K] with d [K, B, *R] (example b's
    Gram matrix for the columns d[:, b]). `dim` is the dimension of the tangent space (for the rank tolerance);
    unknown -> a conservative 1e6.
    """
    K = G.shape[-1]
    if G.dim() == 2:
        c = _solve_psd(G.unsqueeze(0), d.double().reshape(1, K, -1), dim)[0]
    else:
        rhs = d.double().reshape(K, G.shape[0], -1).transpose(0, 1)  # [B, K, R]
        c = _solve_psd(G, rhs, dim).transpose(0, 1)
    return c.reshape(d.shape).to(d.dtype)


def coefficients(
    d: torch.Tensor, aggregation: str, G: torch.Tensor | None = None, dim: int | None = None
) -> torch.Tensor:
    """Per-tangent coefficients c (same shape as d, [K] or [K, B]) such that estimate = sum_k c_k v_k.

    `G` (from `gram`) is needed only for "orthogonal"; `dim` as in `solve_projection`.
    """
    K = d.shape[0]
    if aggregation == "sum":
        return d
    if aggregation == "mean":
        return d / K
    if aggregation == "orthogonal":
        if G is None:
            raise ValueError("orthogonal aggregation needs the Gram matrix of the tangents")
        return solve_projection(G, d, dim)
    raise UsageError(f"option --aggregation: {aggregation!r} is not one of {', '.join(AGGREGATIONS)}")


def combine(tangents: torch.Tensor | Sequence[torch.Tensor], c: torch.Tensor) -> list[torch.Tensor]:
    """sum_k c_k v_k per tangent tensor: [K, *S] with c [K] -> [*S]; [K, B, *S] with c [K, B] -> [B, *S]."""
    out = []
    for t in _as_list(tangents):
        cc = c.to(t.dtype)
        if c.dim() == 1:
            out.append(torch.tensordot(cc, t, dims=1))
        else:
            out.append((cc.view(*cc.shape, *([1] * (t.dim() - 2))) * t).sum(0))
    return out


def dimension(tangents: torch.Tensor | Sequence[torch.Tensor], per_example: bool = False) -> int:
    """Number of coordinates one tangent spans (per example when per_example)."""
    skip = 2 if per_example else 1
    return sum(math.prod(t.shape[skip:]) for t in _as_list(tangents))


def aggregate(
    tangents: torch.Tensor | Sequence[torch.Tensor], d: torch.Tensor, aggregation: str, entries: str = "real"
) -> list[torch.Tensor]:
    """The estimate(s) from tangents and directional derivatives; per-example when d is [K, B].

    Returns one tensor per tangent tensor, without the K dimension. `entries` as in `gram`.
    """
    per_example = d.dim() == 2
    G = gram(tangents, per_example, entries) if aggregation == "orthogonal" else None
    c = coefficients(d, aggregation, G, dimension(tangents, per_example))
    return combine(tangents, c)
