"""Local rules on any model through its anatomy (bpfree.methods.block_local), checked against plain autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bpfree.core import tangents as T
from bpfree.core.errors import UsageError
from bpfree.methods import build as build_method
from bpfree.models import build
from tests.user_models import ResidualCNN, TinyViT


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def batch(shape: tuple[int, ...], n: int = 6, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % classes


def residual_cnn() -> ResidualCNN:
    torch.manual_seed(0)
    model = ResidualCNN()
    model.input_shape = (3, 16, 16)
    return model


def test_l_bp_on_a_user_residual_cnn_is_each_blocks_own_head_loss():
    model = residual_cnn()
    x, y = batch((3, 16, 16))
    est = build_method("l-bp", model, seed=1)
    r = est.step(x, y)
    # reference written out by hand: each block on its detached input, its head's loss by autograd
    m, heads = model, est.heads
    h0 = m.stem(x)
    h1 = m.bn(m.conv(h0.detach()))  # the block ends at bn: the residual sum and ReLU run after its boundary
    h2 = m.down(torch.relu(h1.detach() + h0.detach()))
    for k, (out, params) in enumerate([(h0, list(m.stem.parameters())),
                                       (h1, [*m.conv.parameters(), *m.bn.parameters()]),
                                       (h2, list(m.down.parameters()))]):
        loss = F.cross_entropy(heads[k](out.mean((2, 3))), y)
        params = params + list(heads[k].parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            torch.testing.assert_close(p.grad, g)
    logits = m.fc(torch.relu(h2.detach()).mean((2, 3)))
    torch.testing.assert_close(r.loss, F.cross_entropy(logits, y))
    for p, g in zip(m.fc.parameters(), torch.autograd.grad(F.cross_entropy(logits, y), list(m.fc.parameters()))):
        torch.testing.assert_close(p.grad, g)
    assert [p for p, _ in est.lr_multipliers()[1:]] == [[m.fc.weight, m.fc.bias]]


def test_l_bp_trains_a_parameter_between_blocks_from_the_next_block():
    torch.manual_seed(0)
    vit = TinyViT()
    vit.input_shape = (3, 16, 16)
    est = build_method("l-bp", vit, seed=0)
    est.step(*batch((3, 16, 16)))
    assert vit.pos.grad.abs().sum() > 0  # added after the patch block's (detached) output, before layer 0
    assert id(vit.pos) not in {id(p) for p in est.lr_multipliers()[1][0]}  # not the readout


@pytest.mark.parametrize("local, fa", [("l-bp", "l-fa"), ("lg-bp", "lg-fa")])
@pytest.mark.parametrize("make", ["vit", "resnet18"])
def test_l_fa_with_feedback_equal_to_the_weights_is_l_bp(local, fa, make):
    """B = W in every layer (attention projections included) and head turns l-fa into l-bp exactly."""
    def model():
        torch.manual_seed(0)
        if make == "vit":
            m = TinyViT()
            m.input_shape = (3, 16, 16)
            return m
        return build("resnet18", 10, (3, 16, 16), width=4)

    x, y = batch((3, 16, 16))
    ref, est = build_method(local, model(), seed=0), build_method(fa, model(), seed=0)
    for a, b in zip(ref.heads.parameters(), est.heads.parameters()):
        b.data.copy_(a.data)
    est.feedback = [w.detach() for _, w in est.fa_weights]
    est.head_feedback = [h.weight.detach() for h in est.heads]
    ref.step(x, y)
    est.step(x, y)
    for a, b in zip(ref.trainable(), est.trainable()):
        torch.testing.assert_close(a.grad, b.grad)
    assert len(est.fa_weights) == (9 if make == "vit" else 20)  # ViT: patch conv; per layer in, out, 2 MLP


def test_lg_bp_on_resnet18_is_autograd_of_the_patch_group_losses():
    """Eqs. 4-5 of Ren et al. built literally: copy (p, g) sees the pooled feature with only patch p of group g
    live (every other entry under stop-gradient); the block gradient is that of the sum over copies (mean over the
    batch), the head's that of the ordinary loss."""
    torch.manual_seed(0)
    model = build("resnet18", 10, (3, 8, 8), width=4)
    x, y = batch((3, 8, 8))
    groups = 2
    est = build_method("lg-bp", model, seed=1, groups=groups)
    r = est.step(x, y)
    h = x
    for k, block in enumerate(model.blocks):
        out = block(h.detach())
        b, c, hh, ww = out.shape
        flat = out.flatten(2)  # [B, C, P]
        per_group = c // groups
        copies = []
        for p in range(hh * ww):
            for g in range(groups):
                live = torch.zeros_like(flat)
                live[:, g * per_group:(g + 1) * per_group, p] = 1
                mixed = live * flat + (1 - live) * flat.detach()
                copies.append(F.cross_entropy(est.heads[k](mixed.mean(-1)), y))
        block_params = list(block.parameters())
        for p, g in zip(block_params, torch.autograd.grad(sum(copies), block_params)):
            torch.testing.assert_close(p.grad, g)
        ordinary = F.cross_entropy(est.heads[k](flat.mean(-1)), y)
        torch.testing.assert_close(copies[0], ordinary)  # every copy has the ordinary loss's value
        torch.testing.assert_close(r.extra[f"local_loss_{k}"], float(ordinary.detach()))
        for p, g in zip(est.heads[k].parameters(), torch.autograd.grad(ordinary, list(est.heads[k].parameters()))):
            torch.testing.assert_close(p.grad, g)
        h = out


def test_lg_fg_a_is_unbiased_where_a_module_output_is_the_block_output():
    """On an MLP (each block: Linear + ReLU, one patch) copy g's directional derivative only sees group g of the
    Linear's output, so the activity-perturbation estimate is unbiased for the grid's exact gradient (= lg-bp)."""
    def model():
        torch.manual_seed(0)
        return build("mlp", 10, (1, 4, 4), hidden=(8, 8))

    x, y = batch((1, 4, 4))
    ref = build_method("lg-bp", model(), seed=0, groups=2)
    ref.step(x, y)
    est = build_method("lg-fg-a", model(), seed=0, groups=2, tangents=4000)
    est.step(x, y)
    for a, b in zip(ref.trainable(), est.trainable()):
        err = (a.grad - b.grad).norm() / a.grad.norm()
        assert err < 0.1, err


@pytest.mark.parametrize("aggregation", ["sum", "orthogonal"])
def test_lg_fg_w_uses_the_exact_directional_derivative(aggregation):
    """One weight tangent v (one group): every block's update is d v with d the exact directional derivative of the
    block's own local loss along v (autograd's <l-bp gradient, v>); orthogonal projects: d v / |v|^2 over the
    block's weights."""
    x, y = batch((3, 16, 16))
    ref = build_method("l-bp", residual_cnn(), seed=0)
    ref.step(x, y)
    est = build_method("lg-fg-w", residual_cnn(), seed=0, groups=1, aggregation=aggregation)
    replay = torch.Generator().manual_seed(0)
    replay.set_state(est.generator.get_state())
    est.step(x, y)
    tangents = [T.sample((1, *p.shape), "rademacher", replay, dtype=p.dtype)[0] for ps in est.block_params for p in ps]
    refs = [[p for p in ps if p.requires_grad] for ps in ref.anatomy.block_parameters()]
    k = 0
    for ps, rps in zip(est.block_params, refs):
        vs = tangents[k:k + len(ps)]
        k += len(ps)
        d = sum((r.grad * v).sum() for r, v in zip(rps, vs))
        if aggregation == "orthogonal":
            d = d / sum(v.square().sum() for v in vs)
        for p, v in zip(ps, vs):
            torch.testing.assert_close(p.grad, d * v)


def test_lg_fg_a_orthogonal_with_one_tangent_projects_per_example():
    """K = 1: the orthogonal estimate is the sum estimate divided by each example's |u|^2 (over the block's noise)."""
    x, y = batch((1, 4, 4))

    def run(aggregation: str):  # noqa: ANN202
        torch.manual_seed(0)
        est = build_method("lg-fg-a", build("mlp", 10, (1, 4, 4), hidden=(8, 8)), seed=0, aggregation=aggregation)
        est.step(x, y)
        return est

    plain, ortho = run("sum"), run("orthogonal")
    # each mlp block perturbs one Linear output of 8 Rademacher entries per example: |u|^2 = 8 for every example
    for a, b in zip(plain.anatomy.block_parameters(), ortho.anatomy.block_parameters()):
        for p, q in zip(a, b):
            torch.testing.assert_close(q.grad, p.grad / 8)


def test_lg_rules_check_the_groups():
    with pytest.raises(UsageError, match="does not divide"):
        build_method("lg-bp", residual_cnn(), groups=3)


def test_local_rules_need_two_blocks():
    with pytest.raises(UsageError, match="two or more blocks"):
        build_method("lg-fg-a", build("mlp", 10, (1, 4, 4), hidden=(8,)))


def test_l_fa_state_round_trip_restores_heads_and_feedback():
    x, y = batch((3, 16, 16))
    a = build_method("l-fa", residual_cnn(), seed=0)
    a.step(x, y)
    state = a.state_dict()
    b = build_method("l-fa", residual_cnn(), seed=7)
    b.load_state_dict(state)
    assert a.feedback and a.head_feedback  # non-empty, so the comparisons below compare something
    assert all(torch.equal(u, v) for u, v in zip(a.feedback, b.feedback, strict=True))
    assert all(torch.equal(u, v) for u, v in zip(a.head_feedback, b.head_feedback, strict=True))
    assert all(torch.equal(u, v) for u, v in zip(a.heads.parameters(), b.heads.parameters(), strict=True))


@pytest.mark.slow
def test_lg_fg_a_is_unbiased_on_a_residual_cnn_with_batch_norm():
    """Noise after each batch norm (its estimate back through the norm and the conv before it) and at the last
    block's stride-2 conv, whose output is the block output ([16, 4, 4]: 16 patches, 2 groups): each copy's noise
    slice is its own, so the estimate is unbiased for lg-bp (biases before a batch norm: gradient 0)."""
    def small() -> ResidualCNN:
        torch.manual_seed(0)
        model = ResidualCNN(10, (3, 8, 8))
        model.input_shape = (3, 8, 8)
        return model

    x, y = batch((3, 8, 8), n=4)
    ref = build_method("lg-bp", small(), seed=0, groups=2)
    ref.step(x, y)
    est = build_method("lg-fg-a", small(), seed=0, groups=2, tangents=1500)
    est.step(x, y)
    for (name, a), b in zip(ref.model.named_parameters(), est.model.parameters()):
        if a.grad.norm() > 1e-10:
            err = (a.grad - b.grad).norm() / a.grad.norm()
            assert err < 0.15, (name, err)
        else:
            assert b.grad.norm() < 1e-10, name


def test_l_bp_on_a_block_model_is_blockwise_backprop_with_local_heads():
    torch.manual_seed(0)
    model = build("resnet18", 3, (1, 8, 8), width=4)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    est = build_method("l-bp", model, seed=1)
    assert len(est.heads) == len(model.blocks)
    assert {id(p) for p in est.trainable()} >= {id(p) for p in est.heads.parameters()}
    est.step(x, y)
    # reference: block k's own head loss on its detached input, by plain autograd (BN in train mode both times)
    h = x
    for k, block in enumerate(model.blocks):
        out = block(h.detach())
        loss = F.cross_entropy(est.heads[k](out.mean((2, 3))), y)
        params = [*block.parameters(), *est.heads[k].parameters()]
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            torch.testing.assert_close(p.grad, g)
        h = out
    loss = F.cross_entropy(model.head(h.detach()), y)
    for p, g in zip(model.head.parameters(), torch.autograd.grad(loss, list(model.head.parameters()))):
        torch.testing.assert_close(p.grad, g)
    with pytest.raises(UsageError, match="two or more blocks"):
        build_method("l-bp", build("mlp", 3, (1, 4, 4), hidden=(8,)))
    with pytest.raises(UsageError):
        build_method("l-bp", model, objective="contrastive")


def test_l_bp_on_a_block_model_trains_through_the_trainer_and_resumes(tmp_path):
    from bpfree.training.train import TrainConfig, train

    torch.set_default_dtype(torch.float32)
    try:
        kw = dict(method="l-bp", model="resnet18", data="digits", batch_size=128, lr=0.05, train_size=512,
                  model_options={"width": 4}, method_options={"readout_lr_mult": 0.1})
        full = train(TrainConfig(out=str(tmp_path / "full"), epochs=2, **kw))
        train(TrainConfig(out=str(tmp_path / "part"), epochs=1, **kw))
        resumed = train(TrainConfig(out=str(tmp_path / "part"), epochs=2, resume=True, **kw))
    finally:
        torch.set_default_dtype(torch.float64)
    keys = ("train_loss", "train_error", "test_error", "test_loss", "local_loss_0")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in full]
    assert full[-1]["local_loss_0"] < full[0]["local_loss_0"]


@pytest.mark.parametrize("options", [{}, {"tangents": 3, "aggregation": "orthogonal"}])
def test_lg_fg_a_gradients_are_the_same_when_a_norms_input_is_made_again(monkeypatch, options):
    """A conv or Linear whose output goes straight into a norm is run again for the norm's VJP instead of the norm's
    graph keeping that output: the gradients are the same, bit for bit, as when it is kept."""
    import bpfree.methods.block_local as block_local

    def grads(rerun: tuple) -> list[torch.Tensor]:
        monkeypatch.setattr(block_local, "RERUNNABLE", rerun)
        torch.manual_seed(0)
        est = build_method("lg-fg-a", build("resnet18", 10, (3, 8, 8), width=4), seed=0, **options)
        x, y = batch((3, 8, 8), n=4)
        for _ in range(2):  # the second step starts from the first's batch-norm statistics
            est.step(x, y)
        return [p.grad.clone() for p in est.trainable()]

    kept, rerun = grads(()), grads(block_local.RERUNNABLE)
    assert len(kept) == len(rerun) > 20
    assert all(torch.equal(a, b) for a, b in zip(kept, rerun, strict=True))


def test_lg_fg_w_leaves_a_parameter_between_blocks_untrained_and_the_blocks_unchanged():
    """The positional embedding goes into lg-fg-w's pass detached: zero gradient, and every other gradient as with
    the embedding frozen."""
    import copy

    torch.manual_seed(0)
    vit = TinyViT()
    vit.input_shape = (3, 16, 16)
    frozen = copy.deepcopy(vit)
    frozen.pos.requires_grad_(False)
    for model in (vit, frozen):
        build_method("lg-fg-w", model, seed=0).step(*batch((3, 16, 16)))
    assert torch.count_nonzero(vit.pos.grad) == 0
    for (name, p), q in zip(vit.named_parameters(), frozen.parameters()):
        if name != "pos":
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
