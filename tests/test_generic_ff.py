"""Forward-Forward and Scalable FF on models other than the ones they were written for, through the anatomy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from test_anatomy import ResidualCNN, TinyViT

from bpfree.methods import build as build_method
from bpfree.methods.forward_forward import example_rms_normalise


def residual_cnn() -> ResidualCNN:
    torch.manual_seed(0)
    model = ResidualCNN()
    model.input_shape = (3, 16, 16)
    return model


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 10


def test_sff_block_on_a_user_cnn_is_each_units_goodness_loss_on_its_normalised_detached_input():
    model = residual_cnn()
    x, y = batch()
    est = build_method("sff-block", model, seed=0)
    est.step(x, y)
    m, heads = model, est.heads

    def ln(h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, h.shape[1:]).detach()

    h0 = m.stem(x)
    h1 = m.bn(m.conv(ln(h0)))
    h2 = m.down(torch.relu(ln(h1) + ln(h0)))
    for k, (out, params) in enumerate([(h0, list(m.stem.parameters())),
                                       (h1, [*m.conv.parameters(), *m.bn.parameters()]),
                                       (h2, list(m.down.parameters()))]):
        loss = F.cross_entropy(heads[k](out).pow(2).mean((2, 3)), y)
        params = params + list(heads[k].parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            torch.testing.assert_close(p.grad, g)
    assert all(p.grad is None or torch.all(p.grad == 0) for p in m.fc.parameters())


def test_sff_on_tokens_measures_goodness_per_token():
    torch.manual_seed(0)
    vit = TinyViT()
    vit.input_shape = (3, 16, 16)
    est = build_method("sff", vit, seed=0)
    goods = est.unit_goodness(batch()[0])
    assert [tuple(g.shape) for g in goods] == [(6, 10)] * 3


def test_ff_on_a_user_cnn_overlays_the_label_and_trains_each_block_on_its_goodness():
    model = residual_cnn()
    x, y = batch()
    est = build_method("ff", model, seed=0, negatives="random")
    replay = torch.Generator().manual_seed(0)
    replay.set_state(est.generator.get_state())
    r = est.step(x, y)
    y_neg = (y + torch.randint(1, 10, y.shape, generator=replay)) % 10
    labelled = est.overlay(x, F.one_hot(y, 10))
    assert labelled.shape == x.shape
    assert torch.equal(labelled.flatten(1)[:, :10], 3.0 * F.one_hot(y, 10).float())
    assert torch.equal(labelled.flatten(1)[:, 10:], x.flatten(1)[:, 10:])
    h = torch.cat([labelled, est.overlay(x, F.one_hot(y_neg, 10))])
    m = model
    h0 = m.stem(h)
    h1 = m.bn(m.conv(example_rms_normalise(h0).detach()))
    h2 = m.down(torch.relu(example_rms_normalise(h1).detach() + example_rms_normalise(h0).detach()))
    for k, (out, params) in enumerate([(h0, list(m.stem.parameters())),
                                       (h1, [*m.conv.parameters(), *m.bn.parameters()]),
                                       (h2, list(m.down.parameters()))]):
        good = out.pow(2).mean((2, 3)).sum(1) / out.shape[1] - 1.0  # mean form, threshold 1
        loss = F.softplus(50.0 * (good[6:] - good[:6])).mean()
        assert abs(r.extra[f"loss_layer{k}"] - float(loss.detach())) < 1e-5
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    scores = est.predict(x)
    assert scores.shape == (6, 10)
