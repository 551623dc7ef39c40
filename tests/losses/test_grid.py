"""The fused patch x group local-loss grid (`bpfree.losses.grid`) against P x G explicit copies."""

from __future__ import annotations

import pytest
import torch

from bpfree.losses import local_loss_grid, nt_xent
from tests.fastpaths.test_localmixer_local import naive_copy_losses, supervised, tiny

pytestmark = pytest.mark.usefixtures("float64_one_thread")  # exactness checks on tiny tensors


@pytest.mark.parametrize("objective", ["supervised", "contrastive"])
def test_fused_grid_matches_naive_copies(objective):
    model = tiny(head_dim=0 if objective == "supervised" else 5)
    b = 6
    h = torch.randn(b, 4, 8, requires_grad=True)
    y = torch.randint(0, 3, (b,))
    fn = supervised(model, 0, y) if objective == "supervised" else (lambda m: nt_xent(model.head(0, m), 0.5))
    weight = torch.randn(b, 4, 2)
    naive = naive_copy_losses(h, 2, fn)
    grid = local_loss_grid(h, 2, fn, model.head_input)
    fused = grid.values(h)
    torch.testing.assert_close(fused, naive)
    head = list(model.heads[0].parameters())
    g_naive = torch.autograd.grad((weight * naive).sum(), [h, *head])
    g_fused = torch.autograd.grad((weight * fused).sum(), [h, *head])
    for a, e in zip(g_fused, g_naive):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(grid.output_grad(weight), g_naive[0])
    # forward-mode: directional derivative of every copy along a tangent of h
    tangent = torch.randn_like(h)
    _, jvp = torch.func.jvp(lambda hh: naive_copy_losses(hh, 2, fn), (h.detach(),), (tangent,))
    torch.testing.assert_close(grid.directional(tangent), jvp)
