"""The fused patch-wise + group-wise local loss grid.

For block output h [B, P, C] (C channels in G groups), a local head sees features m = head_input(h) [B, C] that
keep the (patch, group) slots apart: feature group g depends on h[b, p, group g] through that slot alone and
then an average over patches (LocalMixer: LN per token and group, then mean over patches). The paper replicates
the loss for every (patch p, group g): copy (p, g) sees m with every slot but h[b, p, group g] under
stop-gradient. Every copy has the value of the ordinary loss L_b, and its gradient reaches only its own slot,
where it equals the ordinary gradient there:

    d L_{b,p,g} / d h[b, p, group g] = (dL_b/dh)[b, p, group g],   zero elsewhere.

So one head evaluation and one backward to h (for dL/dh) give the whole grid, its backward (any weighting of
the copies) and its forward-mode derivatives: the directional derivative of copy (p, g) along a tangent h_dot of
the block output is sum_{c in g} (dL_b/dh)[b, p, c] * h_dot[b, p, c]. No P x G copies of the head are built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class LossGrid:
    """One block's local loss grid. `per_example` [B] keeps its graph to the head's parameters."""

    per_example: torch.Tensor
    output_slope: torch.Tensor  # [B, P, C]: d per_example[b] / d h[b], detached
    groups: int

    def _grouped_slope(self) -> torch.Tensor:
        return self.output_slope.unflatten(-1, (self.groups, -1))  # [B, P, G, C/G]

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """The [B, P, G] grid, connected to autograd: entry (p, g) has the loss's value, and its gradient
        reaches h only at patch p, group g (and the head parameters as the ordinary loss does).

        A first-order construction (value + (h - SG(h))·slope): exact for gradients and forward derivatives,
        which is all a training step needs.
        """
        live = (h - h.detach()).unflatten(-1, (self.groups, -1))  # zero value, identity gradient
        return self.per_example[:, None, None] + (live * self._grouped_slope()).sum(-1)

    def directional(self, h_dot: torch.Tensor) -> torch.Tensor:
        """Forward-mode derivative of every copy along the output tangent h_dot [..., B, P, C] -> [..., B, P, G]."""
        return (h_dot * self.output_slope).unflatten(-1, (self.groups, -1)).sum(-1)

    def output_grad(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient w.r.t. h [B, P, C] of sum_{b,p,g} weight[b,p,g] * grid[b,p,g] (weight defaults to ones)."""
        if weight is None:
            return self.output_slope
        return (weight.unsqueeze(-1) * self._grouped_slope()).flatten(-2)


def local_loss_grid(
    h: torch.Tensor,
    groups: int,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    features: Callable[[torch.Tensor], torch.Tensor],
) -> LossGrid:
    """Build the loss grid of block output h [B, P, C] with groups channel groups.

    features maps h to the head's input [B, C] and must keep the (patch, group) slots apart (module docstring);
    loss_fn maps those features to per-example losses [B]; example b's loss must depend (through gradients) on
    row b only — contrastive losses put the other examples under stop-gradient.
    """
    leaf = h.detach().requires_grad_(True)
    with torch.enable_grad():
        per = loss_fn(features(leaf))
        (grad,) = torch.autograd.grad(per.sum(), leaf, retain_graph=True)
    return LossGrid(per, grad.detach(), groups)
