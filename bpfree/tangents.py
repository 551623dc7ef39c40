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
The K x K Gram matrix is accumulated in float64 (for Rademacher tangents from exact float32 integer matmuls, see
`gram`) and the system solved in float64 with an eigenvalue pseudo-inverse: K larger than the space's dimension (a
singular Gram matrix) still gives exactly the projection instead of failing, and nearly dependent tangents keep
float64's accuracy (a float32 inverse loses it once the Gram's condition number nears 1/eps32).

Sampling: `rademacher` (+-1) is built from random BITS (one 64-bit draw gives 56 signs, expanded through a
256 x 8 lookup table); measured on this CPU for 3M numbers: torch.normal_ 31 ms, this 2.8 ms (11x).
It also has lower estimator variance than Gaussian tangents (E[v^4] = 1, not 3), with the same E[v v^T] = I.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

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


def _exact_in_own_dtype(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float32, torch.float64)


def gram(
    tangents: torch.Tensor | Sequence[torch.Tensor],
    per_example: bool = False,
    integer_entries: bool = False,
    chunk: int = 1 << 20,
) -> torch.Tensor:
    """Float64 Gram matrix of the tangents, summed over all given tensors.

    tangents [K, *S] -> [K, K]; with per_example=True, tangents [K, B, *S] -> [B, K, K] (one per example).

    integer_entries=True promises entries in {-1, 0, 1} (Rademacher tangents, possibly masked): then every product
    and partial sum is an integer, exact in float32 below 2^24, so each chunk of up to 2^24 coordinates is reduced
    in the tangents' own dtype (one matmul, no float64 copy) and only the K x K results are summed in float64. The
    result is the same, bit for bit, as the float64 route, which is used otherwise: columns converted to float64
    in chunks so that the copy never exceeds K * chunk (* B) numbers.
    """
    G: torch.Tensor | None = None
    for t in _as_list(tangents):
        K = t.shape[0]
        fast = integer_entries and _exact_in_own_dtype(t)
        if per_example:
            B = t.shape[1]
            flat = t.reshape(K, B, -1).transpose(0, 1)  # [B, K, m]
            step = 1 << 24 if fast else max(1, chunk // max(1, B))
            for s in range(0, flat.shape[-1], step):
                part = flat[..., s : s + step] if fast else flat[..., s : s + step].double()
                g = torch.bmm(part, part.transpose(1, 2)).double()
                G = g if G is None else G + g
        else:
            flat = t.reshape(K, -1)
            step = 1 << 24 if fast else chunk
            for s in range(0, flat.shape[-1], step):
                part = flat[:, s : s + step] if fast else flat[:, s : s + step].double()
                g = (part @ part.T).double()
                G = g if G is None else G + g
    if G is None:
        raise ValueError("gram() needs at least one tangent tensor")
    return G


def projection_pinv(G: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Float64 pseudo-inverse of the Gram matrix ([K, K] or [B, K, K]), for c = G^+ d.

    `dim` is the dimension of the tangent space (for the rank tolerance); unknown -> a conservative 1e6.
    """
    rtol = _RTOL_PER_DIM * max(dim or 10**6, G.shape[-1])
    # Symmetrise: the two float64 triangles can differ in the last bit after chunked summation.
    Gs = 0.5 * (G + G.transpose(-1, -2))
    return torch.linalg.pinv(Gs, hermitian=True, rtol=rtol)


def solve_projection(G: torch.Tensor, d: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """c = G^+ d in float64 (G [K,K] with d [K], or G [B,K,K] with d [K,B]); returns d's shape and dtype.

    `dim` as in `projection_pinv`.
    """
    pinv = projection_pinv(G, dim)
    if d.dim() == 1:
        c = pinv @ d.double()
    else:
        c = (pinv @ d.double().T.unsqueeze(-1)).squeeze(-1).T  # [B,K,K] @ [B,K,1] -> [K,B]
    return c.to(d.dtype)


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
    tangents: torch.Tensor | Sequence[torch.Tensor], d: torch.Tensor, aggregation: str, integer_entries: bool = False
) -> list[torch.Tensor]:
    """The estimate(s) from tangents and directional derivatives; per-example when d is [K, B].

    Returns one tensor per tangent tensor, without the K dimension. `integer_entries` as in `gram`.
    """
    per_example = d.dim() == 2
    G = gram(tangents, per_example, integer_entries) if aggregation == "orthogonal" else None
    c = coefficients(d, aggregation, G, dimension(tangents, per_example))
    return combine(tangents, c)
