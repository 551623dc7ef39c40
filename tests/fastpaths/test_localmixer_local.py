"""LocalMixer, the fused local loss grid and the local methods (l-bp, lg-bp, lg-fg-a, lg-fg-w).

References here are naive and independent of the implementation: P x G explicit copies of the head loss with
stop-gradients, and per-copy autograd through a re-written block forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bpfree.core.errors import UsageError
from bpfree.losses import augment
from bpfree.methods import build as build_method
from bpfree.models import build
from bpfree.models.localmixer import LocalMixer

pytestmark = pytest.mark.usefixtures("float64_one_thread")  # exactness checks on tiny tensors


def tiny(blocks: int = 2, grid: int = 2, channels: int = 8, groups: int = 2, head_dim: int = 0) -> LocalMixer:
    torch.manual_seed(0)
    model = build(
        "localmixer-m8-16", 3, (1, 4, 4), blocks=blocks, grid=grid, channels=channels, groups=groups, head_dim=head_dim
    )
    # a non-zero readout and larger biases so that nothing is degenerate at init
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.3)
        model.readout.weight.normal_(0, 0.3)
    return model.double()


def naive_slot_norm(v: torch.Tensor) -> torch.Tensor:
    """Non-affine LayerNorm of one token's channels of one group (last dim), from its definition."""
    mean = v.sum(-1, keepdim=True) / v.shape[-1]
    var = ((v - mean) ** 2).sum(-1, keepdim=True) / v.shape[-1]
    return (v - mean) / torch.sqrt(var + 1e-5)


def naive_head_input(h: torch.Tensor, groups: int, live: tuple[int, int] | None = None) -> torch.Tensor:
    """The authors' local-head input, token by token and group by group: every (patch, group) slot of h
    [B, P, C] normalised on its own, then the average over patches -> [B, C]. With `live` = (p, g) every other
    slot is under stop-gradient (one copy of the paper's loss grid)."""
    b, p, c = h.shape
    cg = c // groups
    total = torch.zeros(b, c, dtype=h.dtype)
    for pi in range(p):
        for g in range(groups):
            slot = h[:, pi, g * cg : (g + 1) * cg]
            if live is not None and live != (pi, g):
                slot = slot.detach()
            pad = [torch.zeros(b, g * cg, dtype=h.dtype), naive_slot_norm(slot),
                   torch.zeros(b, c - (g + 1) * cg, dtype=h.dtype)]
            total = total + torch.cat(pad, -1)
    return total / p


def naive_copy_losses(h: torch.Tensor, groups: int, loss_fn) -> torch.Tensor:
    """[B, P, G] losses from P x G explicit copies with the paper's stop-gradient construction."""
    b, p, c = h.shape
    rows = [torch.stack([loss_fn(naive_head_input(h, groups, (pi, g))) for g in range(groups)], -1)
            for pi in range(p)]
    return torch.stack(rows, 1)


# --- the exact LG gradient by per-copy autograd (reference for lg-bp and the forward-gradient methods) -----


def supervised(model, i, y):
    return lambda pooled: F.cross_entropy(model.head(i, pooled), y, reduction="none")


def block_units(block, x):
    """Re-written block forward returning (out, list of (post-LN activity a, a recomputed from the detached
    linear input so that backprop through it crosses that LN and linear only))."""
    ln = lambda t, g=1: F.layer_norm(t.unflatten(-1, (g, -1)), (t.shape[-1] // g,)).flatten(-2)  # noqa: E731
    grouped = lambda t: (  # noqa: E731
        torch.einsum("bpgi,goi->bpgo", t.unflatten(-1, (block.groups, -1)), block.group_weight).flatten(-2)
        + block.group_bias
    )
    units = []
    h = x
    if block.token_mix is not None:
        t = ln(x)
        mix = lambda t: (t.transpose(1, 2) @ block.token_mix.weight.T + block.token_mix.bias).transpose(1, 2)  # noqa: E731
        a = ln(mix(t))
        units.append((a, ln(mix(t.detach()))))
        h = F.relu(a)
    t = ln(h)
    a = ln(block.channel(t))
    units.append((a, ln(block.channel(t.detach()))))
    t = ln(F.relu(a), block.groups)
    a = ln(grouped(t), block.groups)
    units.append((a, ln(grouped(t.detach()), block.groups)))
    out = F.relu(a + x) if block.token_mix is not None else F.relu(a)
    return out, units


def exact_lg_grads(model, i, x, y, token_target: str = "block"):
    """The LG gradient from the per-copy losses, mean over batch, through one LN + linear per unit: copy (p, g)
    credits slice (p, group g) of every unit's activity, except at the token-mixing unit under the authors'
    definition (token_target "block"), where it credits every channel of patch p. token_target "group" (slice
    (p, group g) there too) is a different, group-diagonal target: the tests' way to show they can fail."""
    block = model.blocks[i]
    out, units = block_units(block, x)
    losses = naive_copy_losses(out, block.groups, supervised(model, i, y))
    b, p, g = losses.shape
    cg = out.shape[-1] // g
    acts = [a for a, _ in units]
    deltas = [torch.zeros_like(a) for a in acts]
    token_unit = 0 if block.token_mix is not None and token_target == "block" else None
    for pi in range(p):
        for gi in range(g):
            grads = torch.autograd.grad(losses[:, pi, gi].sum() / b, acts, retain_graph=True)
            for u, (d, gr) in enumerate(zip(deltas, grads)):
                sl = slice(None) if u == token_unit else slice(gi * cg, (gi + 1) * cg)
                d[:, pi, sl] += gr[:, pi, sl]
    params = list(block.parameters())
    grads = torch.autograd.grad([loc for _, loc in units], params, grad_outputs=deltas, allow_unused=True)
    return [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]


def block_input(model, x, i):
    h = model.tokens(x)
    for block in model.blocks[:i]:
        h = block(h)
    return h.detach()


def data(n=4):
    torch.manual_seed(1)
    return torch.randn(n, 1, 4, 4), torch.randint(0, 3, (n,))


def test_lg_bp_is_the_exact_lg_gradient():
    """lg-bp against autograd of the authors' per-copy losses (a two-block mixer, so block 1 has a token-mixing
    unit): the token-mixing weight's gradient and every other one. Under their definition it equals l-bp, the
    ordinary block-local gradient; the group-diagonal target differs at the token-mixing weight."""
    model = tiny()
    x, y = data()
    build_method("lg-bp", model).step(x, y)
    for i, block in enumerate(model.blocks):
        ref = exact_lg_grads(model, i, block_input(model, x, i), y)
        for p, r in zip(block.parameters(), ref):
            torch.testing.assert_close(p.grad, r)
    group = exact_lg_grads(model, 1, block_input(model, x, 1), y, "group")
    assert not torch.allclose(model.blocks[1].token_mix.weight.grad, group[0])
    lg = [p.grad.clone() for p in model.parameters()]
    build_method("l-bp", model).step(x, y)
    for p, g in zip(model.parameters(), lg):
        torch.testing.assert_close(p.grad, g)


def test_stop_gradient_between_blocks():
    """A block's gradient does not depend on any later block or head: perturbing them changes nothing."""
    for method in ["l-bp", "lg-bp", "lg-fg-a", "lg-fg-w"]:
        model = tiny(blocks=3)
        x, y = data()
        build_method(method, model, seed=3).step(x, y)
        before = [p.grad.clone() for p in model.blocks[0].parameters()]
        with torch.no_grad():
            for p in [*model.blocks[1].parameters(), *model.heads[1].parameters(), *model.readout.parameters()]:
                p.add_(torch.randn_like(p))
        build_method(method, model, seed=3).step(x, y)
        for p, g in zip(model.blocks[0].parameters(), before):
            torch.testing.assert_close(p.grad, g)


def test_heads_and_readout_take_exact_gradients():
    model = tiny()
    x, y = data()
    build_method("lg-fg-a", model).step(x, y)
    feats = model.features(x, detach_between=True)
    for i, h in enumerate(feats):
        loss = F.cross_entropy(model.heads[i](naive_head_input(h.detach(), model.groups)), y)
        for p, g in zip(model.heads[i].parameters(), torch.autograd.grad(loss, list(model.heads[i].parameters()))):
            torch.testing.assert_close(p.grad, g)
    loss = F.cross_entropy(model.classify(model.pooled(feats[-1].detach())), y)
    for p, g in zip(model.readout.parameters(), torch.autograd.grad(loss, list(model.readout.parameters()))):
        torch.testing.assert_close(p.grad, g)


def _mean_and_stderr(model, method, x, y, n, tangents=40):
    """n independent estimates, each the mean over `tangents` tangents (unbiased; cheaper than n*K steps)."""
    est = build_method(method, model, seed=7, tangents=tangents, aggregation="mean")
    samples = []
    for _ in range(n):
        est.step(x, y)
        samples.append(torch.cat([p.grad.flatten() for p in model.blocks.parameters()]))
    s = torch.stack(samples)
    return s.mean(0), s.std(0) / n**0.5


def _assert_unbiased(mean, stderr, target):
    # z-scores against the estimator's own measured spread (t-distributed with n-1 d.o.f.): every coordinate
    # within 5.5 standard errors, and their mean square near 1
    z = (mean - target) / stderr.clamp_min(1e-12)
    assert (z.abs() < 5.5).all(), z.abs().max()
    assert z.pow(2).mean() < 1.5, z.pow(2).mean()


def test_lg_fg_a_is_unbiased_for_the_lg_gradient():
    model = tiny()
    x, y = data()

    def target(kind: str) -> torch.Tensor:
        return torch.cat([torch.cat([g.flatten() for g in exact_lg_grads(model, i, block_input(model, x, i), y, kind)])
                          for i in range(len(model.blocks))])

    mean, stderr = _mean_and_stderr(model, "lg-fg-a", x, y, 40)
    _assert_unbiased(mean, stderr, target("block"))
    # and the test can fail: the group-diagonal target differs at the token-mixing unit, detectably so
    with pytest.raises(AssertionError):
        _assert_unbiased(mean, stderr, target("group"))


def exact_fg_w_target(model, i, x, y):
    """Sum over copies of dL_pg/dW restricted to the rows copy (p, g) owns, mean over batch."""
    block = model.blocks[i]
    out, _ = block_units(block, x)
    losses = naive_copy_losses(out, block.groups, supervised(model, i, y))
    b, p, g = losses.shape
    params = dict(block.named_parameters())
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for pi in range(p):
        for gi in range(g):
            grads = torch.autograd.grad(losses[:, pi, gi].sum() / b, list(params.values()), retain_graph=True)
            for (k, v), gr in zip(params.items(), grads):
                if k.startswith("token_mix"):
                    total[k][pi] += gr[pi]
                elif k == "group_weight":
                    total[k][gi] += gr[gi]
                else:
                    rows = v.shape[0] // g
                    total[k][gi * rows : (gi + 1) * rows] += gr[gi * rows : (gi + 1) * rows]
    return torch.cat([t.flatten() for t in total.values()])


def test_lg_fg_w_is_unbiased_for_its_target():
    model = tiny(blocks=2, grid=2, channels=4, groups=2)
    x, y = data()
    target = torch.cat([exact_fg_w_target(model, i, block_input(model, x, i), y) for i in range(2)])
    mean, stderr = _mean_and_stderr(model, "lg-fg-w", x, y, 40)
    _assert_unbiased(mean, stderr, target)


def test_orthogonal_aggregation_with_all_directions_is_exact():
    """K >= n tangents per example span everything: the projection is the exact LG gradient (block 0, one
    patch, so each example's perturbation has n = 2 units x C channels)."""
    model = tiny(blocks=1, grid=1, channels=4, groups=2)
    x, y = data()
    target = exact_lg_grads(model, 0, block_input(model, x, 0), y)
    build_method("lg-fg-a", model, tangents=8, aggregation="orthogonal", tangent_dist="normal").step(x, y)
    for p, t in zip(model.blocks[0].parameters(), target):
        torch.testing.assert_close(p.grad, t)


def test_orthogonal_aggregation_projects_onto_the_masked_tangents():
    """The directional derivatives see the tangents masked by the ReLU derivative, so the Gram matrix must be of
    the masked tangents: then K = the largest number of live coordinates of an example already spans everything
    and the projection is exact, although K is below the unmasked dimension (a Gram matrix of the unmasked
    tangents gives a different, inexact projection here)."""
    model = tiny(blocks=1, grid=1, channels=8, groups=2)
    x, y = data(6)
    h = block_input(model, x, 0)
    _, units = model.blocks[0].trace(h)
    live = sum(u.live.flatten(1).sum(1) for u in units)  # per example
    unmasked = sum(u.live[0].numel() for u in units)
    k = int(live.max())
    assert k < unmasked, (k, unmasked)  # the case where masking matters
    target = exact_lg_grads(model, 0, h, y)
    build_method("lg-fg-a", model, tangents=k, aggregation="orthogonal", tangent_dist="normal").step(x, y)
    for p, t in zip(model.blocks[0].parameters(), target):
        torch.testing.assert_close(p.grad, t)


def test_contrastive_objective_steps_and_checks_heads():
    model = tiny(head_dim=6)
    x, y = data(6)
    for method in ["l-bp", "lg-bp", "lg-fg-a"]:
        r = build_method(method, model, objective="contrastive").step(x, y)
        assert r.logits.shape == (6, 3) and torch.isfinite(r.loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(UsageError):
        build_method("lg-fg-a", tiny(), objective="contrastive")


def test_lg_fg_a_learns_digits_through_the_trainer(tmp_path):
    """End to end through the ordinary trainer: well below chance (90 % error) after a few epochs."""
    from bpfree.training.train import TrainConfig, train

    torch.set_default_dtype(torch.float32)
    try:
        cfg = TrainConfig(
            method="lg-fg-a",
            model="localmixer-m1-16",
            data="digits",
            epochs=2,
            batch_size=32,
            lr=0.01,
            out=str(tmp_path / "run"),
            model_options={"channels": 32, "groups": 4},
        )
        metrics = train(cfg)
    finally:
        torch.set_default_dtype(torch.float64)
    assert metrics[-1]["test_error"] < 40, metrics[-1]


# --- global fg-a / fg-w on LocalMixer: end to end on the readout's loss (the paper's FG-A / FG-W rows) -------


def end_to_end_grads(model, x, y, params):
    """The paper's FG-A target: each unit's weight gradient is the true dL/da at its post-LN activity a
    (which already carries the ReLU derivative) pushed back through that unit's LN and linear only. A unit's
    parameters reach the loss only through a, so by the chain rule this is the ordinary end-to-end gradient of
    the readout loss — which plain autograd gives."""
    return torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)])


@pytest.mark.parametrize(
    "method, options",
    [("fg-a", {}), ("fg-a", {"exact_readout": False}), ("fg-w", {"tangent_dist": "normal"}),
     ("fg-w", {"exact_readout": False})],
)
def test_global_fg_on_localmixer_is_unbiased_for_the_end_to_end_gradient(method, options):
    model = tiny()  # 2 blocks, 2x2 patches: token mixing, residual, tangents crossing blocks
    x, y = data()
    est = build_method(method, model, seed=5, tangents=40, **options)
    assert type(est).__module__ == "bpfree.fastpaths.localmixer_local"  # the LocalMixer path, not the generic one
    params = list(model.blocks.parameters())
    if options.get("exact_readout") is False:
        params += list(model.readout.parameters())
    target = end_to_end_grads(model, x, y, params)
    samples = []
    for _ in range(40):
        est.step(x, y)
        samples.append(torch.cat([p.grad.flatten() for p in params]))
        assert all(torch.all(p.grad == 0) for p in model.heads.parameters())  # heads take no part
    s = torch.stack(samples)
    mean, stderr = s.mean(0), s.std(0) / len(samples) ** 0.5
    _assert_unbiased(mean, stderr, target)
    with pytest.raises(AssertionError):  # a 2x mis-scaled estimator would be caught
        _assert_unbiased(mean, stderr, 2 * target)
    if options.get("exact_readout", True):
        exact = end_to_end_grads(model, x, y, list(model.readout.parameters()))
        torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.readout.parameters()]), exact)


def test_global_fg_a_orthogonal_with_all_directions_is_exact():
    """K >= the per-example activity dimension (2 + 3 units x 4 channels, one patch): the projection onto the
    masked tangents' span is the exact end-to-end gradient."""
    model = tiny(blocks=2, grid=1, channels=4, groups=2)
    x, y = data()
    params = list(model.blocks.parameters())
    target = end_to_end_grads(model, x, y, params)
    build_method("fg-a", model, tangents=24, aggregation="orthogonal", tangent_dist="normal").step(x, y)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in params]), target)


def test_lr_multipliers_give_param_groups_kept_by_the_schedule_and_resume(tmp_path):
    """--head-lr-mult / --readout-lr-mult: their own optimizer groups at multiplier x lr; the cosine schedule keeps
    the ratios; a resumed run equals the uninterrupted one."""
    from bpfree.training.train import Run, TrainConfig, train

    torch.set_default_dtype(torch.float32)
    try:
        kw = dict(method="lg-fg-a", model="localmixer-m1-16", data="digits", batch_size=256, lr=0.01,
                  model_options={"channels": 8, "groups": 2},
                  method_options={"readout_lr_mult": 0.1, "head_lr_mult": 0.5})
        run = Run(TrainConfig(out=str(tmp_path / "probe"), epochs=2, schedule="cosine", **kw), show_progress=False)
        m = run.model

        def lrs() -> dict[int, float]:
            return {id(p): g["lr"] for g in run.optimizer.param_groups for p in g["params"]}

        for _ in range(2):
            got = lrs()
            base = got[id(m.blocks[0].channel.weight)]
            assert base > 0 and got[id(m.blocks[0].channel.bias)] == base
            assert got[id(m.heads[0].weight)] == pytest.approx(0.5 * base)
            assert got[id(m.readout.weight)] == pytest.approx(0.1 * base)
            assert got[id(m.readout.bias)] == pytest.approx(0.1 * base)
            for _ in range(3):
                run.optimizer.step()
                run.schedule.step()
        assert base < 0.01  # the schedule did decay
        with pytest.raises(UsageError):
            build_method("lg-bp", tiny(), readout_lr_mult=-1.0)

        full = train(TrainConfig(out=str(tmp_path / "full"), epochs=2, **kw))
        train(TrainConfig(out=str(tmp_path / "part"), epochs=1, **kw))
        resumed = train(TrainConfig(out=str(tmp_path / "part"), epochs=2, resume=True, **kw))
    finally:
        torch.set_default_dtype(torch.float64)
    keys = ("train_loss", "train_error", "test_error", "test_loss", "lr")
    assert [{k: r[k] for k in keys} for r in resumed] == [{k: r[k] for k in keys} for r in full]


# --- l-bp on block models (resnet18, mobilenetv3-*) ---------------------------------------------------------


def test_bp_contrastive_is_end_to_end_simclr():
    """bp --objective contrastive: plain SimCLR gradients (no stop-gradient) through every block, from the last
    block's projection head; other heads get zeros; the readout is a probe on stopped features."""
    model = tiny(head_dim=6)
    x, y = data(6)
    est = build_method("bp", model, objective="contrastive", temperature=0.5)
    views_gen = torch.Generator().manual_seed(0)
    views_gen.set_state(est.generator.get_state())
    r = est.step(x, y)
    # Reference with the same two views, written independently: symmetric InfoNCE over the 2N views.
    pad = max(1, x.shape[-1] // 8)
    v = torch.cat([augment(x, views_gen, pad), augment(x, views_gen, pad)])
    z = F.normalize(model.heads[1](naive_head_input(model.features(v)[-1], model.groups)), dim=-1)
    sim = z @ z.T / 0.5
    n2 = len(z)
    loss = sum(torch.logsumexp(torch.cat([sim[i, :i], sim[i, i + 1:]]), 0) - sim[i, (i + n2 // 2) % n2]
               for i in range(n2)) / n2
    trunk = [p for name, p in model.named_parameters() if not name.startswith(("heads.", "readout."))]
    expected = torch.autograd.grad(loss, [*trunk, *model.heads[1].parameters()])
    for p, g in zip([*trunk, *model.heads[1].parameters()], expected):
        torch.testing.assert_close(p.grad, g)
    assert all(torch.all(p.grad == 0) for p in model.heads[0].parameters())
    probe_logits = model.classify(model.features(v)[-1].mean(-2))
    torch.testing.assert_close(r.loss, F.cross_entropy(probe_logits, torch.cat([y, y])))
    with pytest.raises(UsageError, match="head-dim"):
        build_method("bp", tiny(), objective="contrastive")
