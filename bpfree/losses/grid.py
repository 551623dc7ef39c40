"""The fused patch-wise + group-wise local loss grid.

For block output h [B, P, C] (C channels in G groups) and a head loss on the pooled feature m = mean_p h, the
paper replicates the loss for every (patch p, group g): copy (p, g) sees the pooled feature
(1/P)(h_{p,g} + sum_{p' != p} SG(h_{p',g})) in group g and SG(m) in the other groups. Every copy has the value of
the ordinary pooled loss L_b, and its gradient reaches only h[b, p, group g]:

    d L_{b,p,g} / d h[b, p, group g] = (1/P) * (dL_b/dm_b)[group g],   zero elsewhere.

So one head evaluation and one head backward (for dL/dm) give the whole grid, its backward (any weighting of
the copies) and its forward-mode derivatives: the directional derivative of copy (p, g) along a tangent h_dot of
the block output is (1/P) * sum_{c in g} (dL_b/dm_b)_c * h_dot[b, p, c]. No P x G copies of the head are built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LossGrid:
    """One block's local loss grid. `per_example` [B] keeps its graph to the head's parameters."""

    per_example: torch.Tensor
    pooled_grad: torch.Tensor  # [B, C]: d per_example[b] / d m[b], detached
    patches: int
    groups: int

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """The [B, P, G] grid, connected to autograd: entry (p, g) has the pooled loss's value, and its gradient
        reaches h only at patch p, group g (and the head parameters as the ordinary loss does).

        A first-order construction (value + (h - SG(h))·slope): exact for gradients and forward derivatives,
        which is all a training step needs.
        """
        live = (h - h.detach()).unflatten(-1, (self.groups, -1))  # zero value, identity gradient
        slope = (self.pooled_grad / self.patches).unflatten(-1, (self.groups, -1)).unsqueeze(1)
        return self.per_example[:, None, None] + (live * slope).sum(-1)

    def directional(self, h_dot: torch.Tensor) -> torch.Tensor:
        """Forward-mode derivative of every copy along the output tangent h_dot [..., B, P, C] -> [..., B, P, G]."""
        prod = h_dot * (self.pooled_grad / self.patches).unsqueeze(-2)
        return prod.unflatten(-1, (self.groups, -1)).sum(-1)

    def output_grad(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient w.r.t. h [B, P, C] of sum_{b,p,g} weight[b,p,g] * grid[b,p,g] (weight defaults to ones)."""
        b, c = self.pooled_grad.shape
        slope = (self.pooled_grad / self.patches).unflatten(-1, (self.groups, -1)).unsqueeze(1)
        if weight is None:
            return slope.expand(b, self.patches, self.groups, c // self.groups).flatten(-2)
        return (weight.unsqueeze(-1) * slope).flatten(-2)


def local_loss_grid(h: torch.Tensor, groups: int, loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> LossGrid:
    """Build the loss grid of block output h [B, P, C] with groups channel groups.

    loss_fn maps pooled features [B, C] to per-example losses [B]; example b's loss must depend (through
    gradients) on pooled[b] only — contrastive losses put the other examples under stop-gradient.
    """
    pooled = h.detach().mean(-2).requires_grad_(True)
    with torch.enable_grad():
        per = loss_fn(pooled)
        (grad,) = torch.autograd.grad(per.sum(), pooled, retain_graph=True)
    return LossGrid(per, grad.detach(), h.shape[-2], groups)
