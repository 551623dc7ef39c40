"""Local contrastive objective (SimCLR-style InfoNCE, as in Ren et al. 2022) and its view augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z: torch.Tensor, temperature: float = 0.5, stop_gradient: bool = True) -> torch.Tensor:
    """Per-example NT-Xent loss [2N] for projections z [2N, D] of two views (rows i and i+N are a pair).

    z is L2-normalised here. By default positives and negatives are under stop-gradient (the paper finds local
    learning fails without it), so example i's loss depends through gradients on its own projection only — which
    is also what makes it a per-example local loss the fused grid can replicate. `stop_gradient=False` is plain
    SimCLR, for end-to-end backprop.
    """
    z = F.normalize(z, dim=-1)
    n2 = z.shape[0]
    if n2 % 2:
        raise ValueError("nt_xent needs an even number of rows (two views)")
    sim = z @ (z.detach() if stop_gradient else z).T / temperature
    self_mask = torch.eye(n2, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    pos = torch.arange(n2, device=z.device).roll(n2 // 2)
    return torch.logsumexp(sim, dim=1) - sim.gather(1, pos[:, None]).squeeze(1)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """A random view: random crop after zero padding by `pad` pixels, then a random horizontal flip.

    (Lighter than SimCLR's colour jitter; all randomness from `generator` so runs are reproducible.)
    """
    b, _, hgt, wid = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=x.device)
    rows = (oy[:, None] + torch.arange(hgt, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(wid, device=x.device))[:, None, :]
    if flip:
        flips = torch.rand(b, generator=generator, device=x.device) < 0.5
        cols = torch.where(flips[:, None, None], cols.flip(-1), cols)
    idx = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2).contiguous()
