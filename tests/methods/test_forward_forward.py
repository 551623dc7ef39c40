"""Forward-Forward and Scalable FF (`bpfree.methods.forward_forward`) on any block-structured model, through the
anatomy: ff on user models, sff / sff-block on resnet18 and mobilenetv3."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bpfree.core.anatomy import pool
from bpfree.core.errors import UsageError
from bpfree.methods import build as build_method
from bpfree.methods.forward_forward import example_rms_normalise, wrong_labels
from bpfree.models import build as build_model
from tests.fastpaths.test_ff_mlp import accuracy, fit
from tests.user_models import ResidualCNN, TinyViT


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


def one_pass_scores(est, x: torch.Tensor) -> torch.Tensor:
    """[B, C]: every label overlaid in one pass of C x B examples, goodness summed over the blocks but the first."""
    b, c = x.shape[0], est.classes
    labelled = est.overlay(x.repeat(c, 1, 1, 1), torch.eye(c).repeat_interleave(b, 0))
    goods: list[torch.Tensor] = []
    with torch.no_grad():
        est.run(labelled, lambda i, out: goods.append(est.goodness(out)) if i > 0 else None)
    return torch.stack(goods).sum(0).view(c, b).t()


def plain_cnn() -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), torch.nn.ReLU())
          for i in range(3)],
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    model.input_shape = (3, 16, 16)
    return model


@pytest.mark.parametrize("make", [plain_cnn, TinyViT])
def test_ff_scores_independent_examples_two_labels_a_pass_as_one_pass_would(make):
    """Without batch statistics the examples of a pass are independent: scoring two labels a pass (2B examples, a
    training pass's worth) gives the scores and the hard negatives of one pass over all C x B."""
    model = make()
    model.input_shape = (3, 16, 16)
    est = build_method("ff", model, seed=0)
    x, y = batch(12)
    passes: list[int] = []
    with torch.no_grad():
        one_pass = one_pass_scores(est, x)
        hook = model.register_forward_pre_hook(lambda m, args: passes.append(len(args[0])))
        chunked = est.goodness_scores(x)
        hook.remove()
    assert passes == [2 * len(x)] * 5
    torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-6)
    draws = [wrong_labels(y, 10, s, torch.Generator().manual_seed(5)) for s in (chunked, one_pass)]
    assert torch.equal(draws[0], draws[1])


def test_ff_scores_in_one_pass_where_batch_norm_uses_the_batchs_statistics():
    """A batch norm in training mode (or without running statistics) normalises each pass by its own statistics,
    so the scores of two labels a pass would differ from one pass's: the scores are one pass of C x B."""
    model = residual_cnn()
    est = build_method("ff", model, seed=0)
    x, _ = batch(6)
    passes: list[int] = []
    model.register_forward_pre_hook(lambda m, args: passes.append(len(args[0])))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = est.goodness_scores(x)
    model.load_state_dict(state)  # the same running statistics for the reference pass
    torch.testing.assert_close(scores, one_pass_scores(est, x), rtol=0, atol=0)
    assert passes[0] == 10 * len(x)
    model.eval()
    passes.clear()
    est.goodness_scores(x)
    assert passes == [2 * len(x)] * 5  # running statistics: each example on its own
    for bn in (model.bn, model.stem[1]):
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    passes.clear()
    est.goodness_scores(x)
    assert passes == [10 * len(x)]


@pytest.mark.parametrize("shape", [(5, 4, 3, 3), (5, 7, 4), (5, 4)])
def test_ff_goodness_backward_is_autograds_bit_for_bit(shape):
    """The goodness's lean backward (one allocation instead of autograd's four) gives autograd's bits."""
    torch.manual_seed(0)
    out, weight = torch.randn(*shape, requires_grad=True), torch.randn(shape[0])
    est = build_method("ff", plain_cnn())
    reference = pool(out.pow(2)).sum(-1)
    assert torch.equal(est.goodness(out), reference)
    (expected,) = torch.autograd.grad((reference * weight).sum(), out)
    (got,) = torch.autograd.grad((est.goodness(out) * weight).sum(), out)
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------------------
# ff refusals; sff / sff-block


def test_ff_refuses_models_without_blocks_and_ff_mlp_only_options():
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 10))
    linear.input_shape = (1, 6, 6)
    with pytest.raises(UsageError, match="needs a model with blocks"):
        build_method("ff", linear)
    with pytest.raises(UsageError, match="ff-mlp only"):
        build_method("ff", build_model("mlp", 10, (1, 6, 6)), peer_norm=0.1)


def tiny(name: str, shape=(1, 12, 12)):
    torch.manual_seed(0)
    options = {"width": 4} if name == "resnet18" else {"width": 0.25}
    return build_model(name, 10, shape, **options)


def layer_norm_detached(h: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(h, h.shape[1:]).detach()


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3-small"])
def test_sff_block_gradient_is_exactly_the_blocks_own_loss(name):
    model = tiny(name)
    est = build_method("sff-block", model, seed=0)
    assert len(est.heads) == len(model.blocks)
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 10, (6,))
    model.train()
    est.step(x, y)
    h = x
    for k, block in enumerate(model.blocks):
        # independent reference: block k's input rebuilt without any graph, then block k's loss alone
        out = block(h)
        goodness = est.heads[k](out).pow(2).mean((2, 3))
        loss = F.cross_entropy(goodness, y)
        params = list(block.parameters()) + list(est.heads[k].parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
        h = layer_norm_detached(out)
    # the model's own classifier is not trained by SFF
    assert not any(p is q for p in est.trainable() for q in model.head.parameters())


@pytest.mark.parametrize("method", ["sff", "sff-block"])
def test_sff_no_gradient_crosses_a_unit_boundary(method):
    model = tiny("resnet18")
    est = build_method(method, model, seed=0)
    units = len(est.heads)
    assert units == (1 + 2 * 8 if method == "sff" else 9)  # stem + two convs per basic block
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 10, (6,))
    model.train()
    est.step(x, y)
    params = est.trainable()
    losses = est.unit_losses(x, y)
    assert len(losses) == units
    owner: dict[int, int] = {}
    total = [torch.zeros_like(p) for p in params]
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for i, g in enumerate(grads):
            if g is None or g.abs().sum() == 0:
                continue
            assert i not in owner, f"parameter {i} gets gradient from units {owner[i]} and {k}"
            owner[i] = k
            total[i] = g
    for p, g in zip(params, total):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    # units are ordered along the network: a unit's loss never reaches parameters of earlier units
    assert list(owner.values()) == sorted(owner.values())


@pytest.mark.parametrize("method,inference", [("sff-block", "mean"), ("sff", "last")])
def test_sff_prediction_does_not_depend_on_the_batch(method, inference):
    model = tiny("mobilenetv3-small")
    est = build_method(method, model, seed=0, inference=inference)
    x = torch.randn(12, 1, 12, 12)
    model.train()
    est.step(x, torch.randint(0, 10, (12,)))  # move BN running statistics away from their initial values
    model.eval()
    full = est.predict(x)
    alone = torch.cat([est.predict(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(alone, full[:4], rtol=1e-4, atol=1e-6)


def test_sff_predict_combines_the_units_goodness():
    model = tiny("resnet18")
    x = torch.randn(5, 1, 12, 12)
    model.eval()
    mean = build_method("sff-block", model, seed=0)
    last = build_method("sff-block", model, seed=0, inference="last")
    last.heads.load_state_dict(mean.heads.state_dict())  # same heads: only the combination differs
    goods = mean.unit_goodness(x)
    assert len(goods) == len(model.blocks) and all(g.shape == (5, 10) for g in goods)
    assert not any(g.requires_grad for g in goods)
    # independent reference for the first unit: the stem's output through head 0
    torch.testing.assert_close(goods[0], mean.heads[0](model.blocks[0](x)).pow(2).mean((2, 3)))
    torch.testing.assert_close(mean.predict(x), sum(goods) / len(goods))
    torch.testing.assert_close(last.predict(x), goods[-1])


def test_sff_block_learns_digits_above_chance(digit_images):
    x, y = digit_images
    torch.manual_seed(0)
    x = (x - 0.3) / 0.4
    model = build_model("resnet18", 10, (1, 8, 8), width=4)
    est = build_method("sff-block", model, seed=0)
    fit(est, x[:800], y[:800], epochs=2, lr=3e-3)
    acc = accuracy(est, x[1400:], y[1400:])
    assert acc > 0.4, acc


def test_sff_heads_are_saved_and_restored():
    model = tiny("resnet18")
    est = build_method("sff", model, seed=0)
    head_params = set(map(id, est.heads.parameters()))
    assert head_params <= set(map(id, est.trainable()))
    state = est.state_dict()
    other = build_method("sff", tiny("resnet18"), seed=5)
    other.load_state_dict(state)
    for a, b in zip(est.heads.parameters(), other.heads.parameters()):
        assert torch.equal(a, b)


def test_sff_rejects_models_without_blocks():
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 10))
    linear.input_shape = (1, 6, 6)
    with pytest.raises(UsageError, match="needs a model with blocks"):
        build_method("sff-block", linear)
