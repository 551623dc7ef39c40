"""LocalMixer's feedback fast paths (`bpfree.fastpaths.localmixer_feedback`): fa, dfa, l-fa, lg-fa."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bpfree.methods import build
from bpfree.models import build as build_model
from tests.methods.test_feedback_alignment import batch, ce_error, fit_and_score


def tiny_mixer(blocks: int = 2) -> nn.Module:
    """Two blocks on a 2x2 patch grid (so token mixing is present), 2 groups, float64."""
    torch.manual_seed(0)
    model = build_model("localmixer-m8-16", 3, (1, 4, 4), blocks=blocks, grid=2, channels=8, groups=2).double()
    with torch.no_grad():  # non-zero readout and biases: nothing degenerate at init
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
        model.readout.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("method,reference", [("l-fa", "l-bp"), ("lg-fa", "lg-bp"), ("fa", "bp")])
def test_mixer_fa_with_feedback_equal_to_weights_is_its_bp(method: str, reference: str) -> None:
    """B = W must reproduce the backprop rule exactly (every unit linear, heads, readout);
    random B must change every block weight's update but no head's or readout's (those stay exact)."""
    model = tiny_mixer()
    x, y = batch(n=5, shape=(1, 4, 4))
    est = build(method, model, seed=1)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if n.startswith("blocks.") and p.dim() >= 2}
    expected |= {"readout.weight"} if method == "fa" else {f"heads.{i}.weight" for i in range(2)}
    assert set(est.feedback.keys()) == expected
    est.step(x, y)
    random_fb = {n: p.grad.clone() for n, p in params.items()}
    est.feedback = {n: params[n].detach().clone() for n in est.feedback.keys()}
    est.step(x, y)
    same_fb = {n: p.grad.clone() for n, p in params.items()}
    build(reference, model).step(x, y)
    for n, p in params.items():
        torch.testing.assert_close(same_fb[n], p.grad, msg=n)
        if n.startswith("blocks.") and p.dim() >= 2:
            assert not torch.allclose(random_fb[n], p.grad), n
        elif not n.startswith("blocks."):
            torch.testing.assert_close(random_fb[n], p.grad, msg=n)


@pytest.mark.parametrize("method", ["l-fa", "lg-fa"])
def test_local_fa_stop_gradient_between_blocks(method: str) -> None:
    """Block 0's update does not depend on any later block, head or the readout."""
    model = tiny_mixer(blocks=3)
    x, y = batch(n=5, shape=(1, 4, 4))
    build(method, model, seed=3).step(x, y)
    before = [p.grad.clone() for p in model.blocks[0].parameters()]
    with torch.no_grad():
        for p in [*model.blocks[1:].parameters(), *model.heads[1:].parameters(), *model.readout.parameters()]:
            p.add_(torch.randn_like(p))
    build(method, model, seed=3).step(x, y)
    for p, g in zip(model.blocks[0].parameters(), before):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("method", ["l-fa", "lg-fa"])
def test_local_fa_state_and_contrastive(method: str) -> None:
    model = build_model("localmixer-m8-16", 3, (1, 4, 4), blocks=2, grid=2, channels=8, groups=2, head_dim=6)
    x, y = batch(n=6, shape=(1, 4, 4))
    est = build(method, model, seed=2, objective="contrastive")
    est.step(x.float(), y)
    state = est.state_dict()
    est.step(x.float(), y)
    first = [p.grad.clone() for p in model.parameters()]
    est2 = build(method, model, seed=9, objective="contrastive")
    est2.load_state_dict(state)
    est2.step(x.float(), y)
    for a, p in zip(first, model.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("method", ["fa", "l-fa", "lg-fa", "dfa"])
def test_mixer_fa_learns_digits(digit_split, method: str) -> None:
    xtr, ytr, xte, yte = digit_split
    torch.manual_seed(0)
    net = build_model("localmixer-m1-16", 10, (1, 8, 8), channels=32, groups=4)
    est = build(method, net, seed=0)
    opt = torch.optim.SGD(est.trainable(), lr=0.05, momentum=0.9)
    acc = fit_and_score(net, est, opt, xtr, ytr, xte, yte)
    assert acc > 0.5, f"{method} on localmixer: test accuracy {acc:.2f} (chance 0.10)"


def test_lg_fa_is_l_fa_with_random_feedback() -> None:
    """Under the authors' LG target (the ordinary block-local gradient at every unit) lg-fa's update is l-fa's,
    through the loss grid, with the same random feedback."""
    model = tiny_mixer()
    x_img, y = batch(n=5, shape=(1, 4, 4))
    est = build("lg-fa", model, seed=4)
    est.step(x_img, y)
    lg_fa = {n: p.grad.clone() for n, p in model.named_parameters()}
    est_l = build("l-fa", model, seed=4)
    est_l.feedback = est.feedback
    est_l.step(x_img, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, lg_fa[n], msg=n)
    assert model.blocks[1].token_mix.weight.grad.abs().sum() > 0


def test_dfa_on_localmixer_is_each_units_local_backward() -> None:
    """Every unit of every block gets e·B_l at its output and pushes it through its own ReLU, LN and linear only
    (written here with ordinary ops and autograd); the readout takes its exact gradient, the heads none."""
    from bpfree.models.localmixer import layer_norm as ln

    model = tiny_mixer()
    x_img, y = batch(n=5, shape=(1, 4, 4))
    est = build("dfa", model, seed=2)
    est.step(x_img, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert len(est.feedback) == 5 and est.feedback[0].shape == (3, 4 * 8)  # 2 + 3 units; classes x (P*C)
    with torch.no_grad():
        feats = model.tokens(x_img)
        for block in model.blocks:
            feats = block(feats)
        pooled = ln(model.pooled(feats))
    e = ce_error(model.readout(pooled), y)
    torch.testing.assert_close(got["readout.weight"], e.T @ pooled)
    torch.testing.assert_close(got["readout.bias"], e.sum(0))
    for n in ["heads.0.weight", "heads.1.bias"]:
        assert torch.equal(got[n], torch.zeros_like(got[n]))
    k, h = 0, model.tokens(x_img)
    for block in model.blocks:
        x, units = h.detach(), []
        t = x
        if block.token_mix is not None:
            units.append((torch.relu(ln(block.mix_tokens(ln(t)))), [block.token_mix.weight, block.token_mix.bias]))
            t = units[-1][0].detach()
        units.append((torch.relu(ln(block.channel(ln(t)))), [block.channel.weight, block.channel.bias]))
        a = ln(block.grouped(ln(units[-1][0].detach(), block.groups)), block.groups)
        units.append((torch.relu(a + x if block.token_mix is not None else a), [block.group_weight, block.group_bias]))
        for out, params in units:
            ref = torch.autograd.grad(out, params, (e @ est.feedback[k]).view_as(out))
            k += 1
            name = {id(p): n for n, p in model.named_parameters()}
            for p, r in zip(params, ref):
                torch.testing.assert_close(got[name[id(p)]], r, msg=name[id(p)])
        h = units[-1][0]
