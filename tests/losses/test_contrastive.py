"""NT-Xent and the two-view augmentation (`bpfree.losses.contrastive`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bpfree.losses import augment, nt_xent

pytestmark = pytest.mark.usefixtures("float64_one_thread")  # exactness checks on tiny tensors


def test_nt_xent_value_and_stop_gradient():
    torch.manual_seed(0)
    z = torch.randn(6, 4, requires_grad=True)
    loss = nt_xent(z, 0.5)
    zn = F.normalize(z.detach(), dim=-1)
    for i in range(6):
        sims = torch.stack([zn[i] @ zn[j] / 0.5 for j in range(6) if j != i])
        pos = zn[i] @ zn[(i + 3) % 6] / 0.5
        torch.testing.assert_close(loss[i], torch.logsumexp(sims, 0) - pos)
    (g,) = torch.autograd.grad(loss[0], z)
    assert g[0].abs().sum() > 0 and torch.all(g[1:] == 0)  # positives and negatives under stop-gradient


def test_augment_is_a_shifted_flipped_crop():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float64).reshape(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    v = augment(x, gen, pad=1)
    assert v.shape == x.shape
    for b in range(2):
        inner = [v[b, 0, 1:3, 1:3], v[b, 0, 1:3, 1:3].flip(-1)]
        assert any(torch.isin(t, x[b]).all() for t in inner)  # the centre always comes from the same image
