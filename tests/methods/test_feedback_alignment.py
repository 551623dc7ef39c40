"""FA, DFA and FDFA against their defining formulas, hand-computed on tiny nets with the estimator's own B."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core.anatomy import boundaries
from bpfree.core.errors import UsageError
from bpfree.methods import build
from bpfree.models import build as build_model
from tests.user_models import ResidualCNN, TinyViT

torch.set_num_threads(1)


def ce_error(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """e = ∂L/∂y for the mean cross-entropy, by hand."""
    return (logits.softmax(1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / logits.shape[0]


def batch(n: int = 8, shape: tuple[int, ...] = (4,), classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------------------------------------------------- FA


def fit_and_score(net, est, opt, xtr, ytr, xte, yte, epochs: int = 2) -> float:
    """Train for a few epochs in batches of 50; test accuracy."""
    net.train()
    for _ in range(epochs):
        for i in range(0, len(ytr), 50):
            opt.zero_grad(set_to_none=True)
            est.step(xtr[i : i + 50], ytr[i : i + 50])
            opt.step()
    net.eval()
    return (est.predict(xte).argmax(1) == yte).float().mean().item()


def test_fa_linear_matches_formula() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    est = build("fa", net, seed=1)
    x, y = batch()
    est.step(x, y)
    W1, W2, W3 = net[0].weight, net[2].weight, net[4].weight
    B1, B2, B3 = est.feedback
    assert B2.shape == W2.shape and B3.shape == W3.shape and not torch.equal(B3, W3)
    with torch.no_grad():
        a1 = x @ W1.T + net[0].bias
        h1 = a1.relu()
        a2 = h1 @ W2.T + net[2].bias
        h2 = a2.tanh()
        e = ce_error(h2 @ W3.T + net[4].bias, y)
        d2 = (e @ B3) * (1 - h2**2)  # B3 where backprop would use W3
        d1 = (d2 @ B2) * (a1 > 0)
    for p, g in [(W3, e.T @ h2), (net[4].bias, e.sum(0)), (W2, d2.T @ h1), (net[2].bias, d2.sum(0)),
                 (W1, d1.T @ x), (net[0].bias, d1.sum(0))]:  # fmt: skip
        torch.testing.assert_close(p.grad, g)


def test_fa_conv_matches_formula() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    ).double()  # fmt: skip
    est = build("fa", net, seed=2)
    x, y = batch(shape=(2, 7, 7))
    est.step(x, y)
    c1, c2, lin = net[0], net[2], net[5]
    B1, B2, B3 = est.feedback
    with torch.no_grad():
        a1 = c1(x)
        h1 = a1.relu()
        a2 = c2(h1)
        h2 = a2.relu()
        e = ce_error(lin(h2.flatten(1)), y)
        d2 = (e @ B3).view_as(a2) * (a2 > 0)
        # The signal to conv1's output is the transposed convolution with B2 in place of conv2's weight.
        d1 = torch.nn.grad.conv2d_input(h1.shape, B2, d2, stride=2) * (a1 > 0)
        gw2 = torch.nn.grad.conv2d_weight(h1, c2.weight.shape, d2, stride=2)
        gw1 = torch.nn.grad.conv2d_weight(x, c1.weight.shape, d1, padding=1)
    torch.testing.assert_close(lin.weight.grad, e.T @ h2.flatten(1))
    torch.testing.assert_close(c2.weight.grad, gw2)
    torch.testing.assert_close(c2.bias.grad, d2.sum((0, 2, 3)))
    torch.testing.assert_close(c1.weight.grad, gw1)
    torch.testing.assert_close(c1.bias.grad, d1.sum((0, 2, 3)))


@pytest.mark.parametrize("seed", [0, 3])
def test_feedback_is_not_the_weights_when_seeds_coincide(seed: int) -> None:
    """Model init and estimator seeded with the same number must not give B = W (FA would be backprop)."""
    torch.manual_seed(seed)
    net = build_model("mlp", 3, (16,), hidden=(200,))
    est = build("fa", net, seed=seed)
    for b, m in zip(est.feedback, [net[1], net[3]]):
        cos = F.cosine_similarity(b.flatten(), m.weight.detach().flatten(), dim=0).abs().item()
        assert cos < 5 / b.numel() ** 0.5  # independent: |cos| ~ 1/sqrt(n); identical streams give 1


def test_fa_with_transposed_weights_is_backprop() -> None:
    """Sanity of the FA machinery: with B = W it must reproduce backprop exactly (incl. BatchNorm)."""
    torch.manual_seed(0)
    net = build_model("fc-bn", 3, (1, 3, 3), width=6, layers=2).double()
    est = build("fa", net)
    est.feedback = [m.weight.detach().clone() for m in net if isinstance(m, nn.Linear)]
    x, y = batch(shape=(1, 3, 3))
    est.step(x, y)
    fa = [p.grad.clone() for p in net.parameters()]
    ref = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    for a, b in zip(fa, ref):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------- DFA, FDFA


@pytest.mark.parametrize("method,timing", [("dfa", None), ("fdfa", "before"), ("fdfa", "after")])
@pytest.mark.parametrize("fast", [True, False])
def test_direct_feedback_mlp_matches_formula(method: str, timing: str | None, fast: bool) -> None:
    """The signal is e·B with B from before this step's feedback update (fdfa's default, the public code's), or
    from after it (--feedback-timing after)."""
    torch.manual_seed(0)
    net = build_model("mlp", 3, (4,), hidden=(5, 6)).double()
    est = build(method, net, seed=1, **({} if timing is None else {"feedback_timing": timing}))
    if not fast:
        est.fast = None  # force the generic autograd / forward-AD path
    x, y = batch()
    est.step(x, y)  # fdfa: B starts at zero, so look at the second step
    before = [b.clone() for b in est.feedback]
    est.step(x, y)
    B1, B2 = est.feedback if timing == "after" else before
    assert B1.shape == (3, 5) and B2.shape == (3, 6)
    l1, l2, l3 = net[1], net[3], net[5]
    with torch.no_grad():
        a1 = l1(x.flatten(1))
        h1 = a1.relu()
        a2 = l2(h1)
        h2 = a2.relu()
        e = ce_error(l3(h2), y)
        d1 = (e @ B1) * (a1 > 0)  # δa_l = (e B_l) ⊙ f'(a_l)
        d2 = (e @ B2) * (a2 > 0)
    for p, g in [(l3.weight, e.T @ h2), (l3.bias, e.sum(0)), (l2.weight, d2.T @ h1), (l2.bias, d2.sum(0)),
                 (l1.weight, d1.T @ x), (l1.bias, d1.sum(0))]:  # fmt: skip
        torch.testing.assert_close(p.grad, g)


def sequential_blocks(est) -> list[nn.Module]:
    """The estimator's blocks of an nn.Sequential, then the readout (the children after the last block)."""
    children = list(est.model)
    blocks = [nn.Sequential(*b.modules) for b in est.anatomy.blocks]
    last = children.index(est.anatomy.blocks[-1].exit)
    return [*blocks, nn.Sequential(*children[last + 1 :])]


def local_reference(blocks: list[nn.Module], x: torch.Tensor, y: torch.Tensor, feedback: list[torch.Tensor]):
    """Each hidden block's gradients from e·B_l at its output through that block alone; the output's exact."""
    grads = []
    h = x
    ins = []
    for b in blocks:
        ins.append(h)
        with torch.no_grad():
            h = b(h)
    logits = blocks[-1](ins[-1])
    e = ce_error(logits.detach(), y)
    for i, b in enumerate(blocks):
        out = b(ins[i])
        signal = e if i == len(blocks) - 1 else (e @ feedback[i]).view_as(out)
        grads += torch.autograd.grad(out, list(b.parameters()), signal)
    return grads


@pytest.mark.parametrize("method", ["dfa", "fdfa"])
@pytest.mark.parametrize("model,shape", [("fc-bn", (1, 4, 4)), ("cnn-small", (1, 8, 8)), ("cnn-small", (3, 16, 16))])
def test_direct_feedback_blocks_are_local(method: str, model: str, shape: tuple[int, ...]) -> None:
    """BatchNorm, pooling, conv: a block's update is its own local backward of e·B_l (B_l to the block output)."""
    torch.manual_seed(0)
    kw = {"width": 7} if model == "fc-bn" else {}
    net = build_model(model, 3, shape, **kw).double().eval()  # eval: BN stats stay put between the two runs
    est = build(method, net, seed=1)
    x, y = batch(n=6, shape=shape)
    est.step(x, y)
    feedback = [b.clone() for b in est.feedback]  # fdfa's signal uses B from before the step's update
    est.step(x, y)
    got = [p.grad.clone() for p in net.parameters()]
    blocks = sequential_blocks(est)
    ref = local_reference(blocks, x, y, feedback)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_fast_path_equals_generic_path_in_training_mode() -> None:
    """The hand-written BN/ReLU formulas (values, tangents, running stats) agree with autograd + forward AD."""
    x, y = batch(n=16, shape=(1, 4, 4))
    results = []
    for fast in (True, False):
        torch.manual_seed(0)
        net = build_model("fc-bn", 3, (1, 4, 4), width=9).double().train()
        est = build("fdfa", net, seed=4, feedback_lr=0.5)
        if not fast:
            est.fast = None
        for _ in range(3):
            est.step(x, y)
        results.append(([p.grad for p in net.parameters()], list(net.buffers()), est.feedback))
    assert len(results[0][2]) == 2
    for a, b in zip(results[0], results[1]):
        for s, t in zip(a, b):
            torch.testing.assert_close(s, t)


def with_perturbations(blocks: list[nn.Module], x: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    h = x
    for b, d in zip(blocks[:-1], deltas):
        h = b(h) + d
    return blocks[-1](h)


@pytest.mark.parametrize("model,shape", [("fc-bn", (1, 4, 4)), ("cnn-small", (1, 8, 8))])
def test_fdfa_one_step_feedback_is_directional_derivative(model: str, shape: tuple[int, ...]) -> None:
    """With λ = 1, B_l = mean_batch(ẏ u_lᵀ) where ẏ = Σ_l J_l u_l, checked with torch.func.jvp and the same u."""
    torch.manual_seed(0)
    kw = {"width": 5} if model == "fc-bn" else {}
    net = build_model(model, 3, shape, **kw).double().eval()
    est = build("fdfa", net, seed=7, feedback_lr=1.0, tangent_dist="normal")  # replayed with torch.randn below
    x, y = batch(n=5, shape=shape)
    est.step(x, y)
    blocks = sequential_blocks(est)
    with torch.no_grad():
        outs, h = [], x
        for b in blocks[:-1]:
            h = b(h)
            outs.append(h)
    g = replay_generator(7)  # replay the estimator's tangents
    us = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    zeros = [torch.zeros_like(o) for o in outs]
    _, y_dot = torch.func.jvp(lambda *d: with_perturbations(blocks, x, list(d)), tuple(zeros), tuple(us))
    for b, u in zip(est.feedback, us):
        torch.testing.assert_close(b, y_dot.T @ u.flatten(1) / x.shape[0])


def replay_generator(seed: int) -> torch.Generator:
    """A generator in the state the estimators start from (see estimator_seed)."""
    from bpfree.methods.base import estimator_seed

    return torch.Generator().manual_seed(estimator_seed(seed))


@pytest.mark.parametrize("fast,dist", [(True, "normal"), (False, "normal"), (True, "rademacher")])
def test_fdfa_feedback_converges_to_jacobian_of_linear_net(fast: bool, dist: str) -> None:
    """On a fixed linear net J_l is constant; the moving average of ẏ u_lᵀ must match it within its noise.

    Per entry, one sample ẏ_i u_j (ẏ_i = Σ_k a_k u_k over all tangent units, a = the i-th rows of all J_l) has mean
    J_ij and variance Σ_k a_k² + J_ij² for normal tangents (E u⁴ = 3), Σ_k a_k² − J_ij² for Rademacher ones (u² = 1);
    a batch mean divides that by N, and an EMA with rate λ at stationarity multiplies it by λ/(2−λ). The bias of
    starting at zero, (1−λ)^T, is below 1e-9 here.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)).double()
    lam, n, steps = 0.1, 32, 200
    est = build("fdfa", net, seed=3, feedback_lr=lam, tangent_dist=dist)
    assert est.fast is not None  # linear blocks take the hand-written path
    if not fast:
        est.fast = None
    x, y = batch(n=n, shape=(6,))
    for _ in range(steps):
        est.step(x, y)
    W2, W3 = net[1].weight.detach(), net[2].weight.detach()
    jac = [W3 @ W2, W3]  # ∂y/∂h_1, ∂y/∂h_2
    row_power = sum((j**2).sum(1, keepdim=True) for j in jac)  # Σ_k a_k² for output i, shape (3, 1)
    worst = 0.0
    for b, j in zip(est.feedback, jac):
        var = (row_power + (1 if dist == "normal" else -1) * j**2) / n * lam / (2 - lam)
        z = (b - j) / var.sqrt()
        worst = max(worst, z.abs().max().item())
        assert (z**2).mean().item() < 3.0  # chi-square-like: mean of squared z-scores ≈ 1
    assert worst < 5.0


# ------------------------------------------------------------------------------------------------- learning




@pytest.mark.parametrize(
    "method,model,kw",
    [("fa", "fc-bn", {"width": 64}), ("dfa", "fc-bn", {"width": 64}), ("fdfa", "fc-bn", {"width": 64}),
     ("fa", "cnn-small", {}), ("dfa", "cnn-small", {}), ("fdfa", "cnn-small", {})],
)  # fmt: skip
def test_learns_digits(digit_split, method: str, model: str, kw: dict) -> None:
    xtr, ytr, xte, yte = digit_split
    torch.manual_seed(0)
    net = build_model(model, 10, (1, 8, 8), **kw)
    est = build(method, net, seed=0)
    opt = torch.optim.Adam(est.trainable(), lr=3e-3)
    acc = fit_and_score(net, est, opt, xtr, ytr, xte, yte)
    assert acc > 0.4, f"{method} on {model}: test accuracy {acc:.2f} (chance 0.10)"


# ------------------------------------------------------------------------------------------- state, errors


@pytest.mark.parametrize("method", ["fa", "dfa", "fdfa"])
def test_state_dict_resumes_exactly(method: str) -> None:
    torch.manual_seed(0)
    net = build_model("mlp", 3, (4,), hidden=(5,))
    est = build(method, net, seed=5)
    x, y = batch(shape=(4,))
    est.step(x.float(), y)
    state = est.state_dict()
    est.step(x.float(), y)
    first = [p.grad.clone() for p in net.parameters()]
    est2 = build(method, net, seed=99)
    est2.load_state_dict(state)
    est2.step(x.float(), y)
    for a, p in zip(first, net.parameters()):
        torch.testing.assert_close(a, p.grad)


def with_shape(model: nn.Module, shape: tuple[int, ...] = (4,)) -> nn.Module:
    model.input_shape = shape
    return model


class NotSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("method", ["fa", "dfa", "fdfa"])
def test_unsupported_models_are_usage_errors(method: str) -> None:
    if method == "fa":
        build(method, NotSequential())  # any module with layers
    else:
        with pytest.raises(UsageError, match="hidden block"):
            build(method, with_shape(NotSequential()))
    with pytest.raises(UsageError, match="cannot handle layer LSTM"):
        build(method, nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4), nn.Linear(4, 3)))
    if method != "fa":
        with pytest.raises(UsageError, match="hidden"):
            build(method, nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))


def test_bad_options_are_usage_errors() -> None:
    net = build_model("mlp", 3, (4,), hidden=(5,))
    with pytest.raises(UsageError, match="feedback-lr"):
        build("fdfa", net, feedback_lr=0.0)
    with pytest.raises(UsageError, match="does not take"):
        build("dfa", net, feedback_lr=0.1)
    with pytest.raises(UsageError, match="too small"):
        build_model("cnn-small", 10, (1, 8, 8), padding="valid")
    with pytest.raises(UsageError, match="layers"):
        build_model("fc-bn", 10, (1, 8, 8), layers=0)


# ------------------------------------------------------------------------------- FA on LocalMixer: fa, l-fa, lg-fa


def test_fdfa_on_localmixer_runs_on_its_blocks() -> None:
    """No fast path: the generic rule on the LocalMixer's declared blocks (B_l per block, heads untouched)."""
    torch.manual_seed(0)
    net = build_model("localmixer-m1-16", 10, (1, 8, 8), blocks=2, grid=2, channels=16, groups=2)
    with torch.no_grad():
        net.readout.weight.normal_(0, 0.3)  # zero at init: then B would stay zero for the first steps
    est = build("fdfa", net, seed=0)
    x, y = batch(n=6, shape=(1, 8, 8), classes=10)
    for _ in range(2):
        est.step(x.float(), y)
    assert len(est.feedback) == len(net.blocks) and all(b.abs().sum() > 0 for b in est.feedback)
    assert all(p.grad.abs().sum() > 0 for p in net.blocks.parameters() if p.dim() > 1)
    assert all(p.grad.abs().sum() == 0 for p in net.heads.parameters())


# ------------------------------------------------------------------------------- FDFA: feedback by an optimizer


def test_fdfa_sgd_feedback_optimizer_is_the_moving_average() -> None:
    """SGD on ½‖B − mean(ẏuᵀ)‖² with lr λ is B − λ(B − estimate) = the moving average: same B, same updates."""
    x, y = batch(n=16, shape=(1, 4, 4))
    runs = []
    for opt in ("average", "sgd"):
        torch.manual_seed(0)
        net = build_model("fc-bn", 3, (1, 4, 4), width=7).double()
        est = build("fdfa", net, seed=2, feedback_lr=0.3, feedback_optimizer=opt)
        for _ in range(3):
            est.step(x, y)
        runs.append((list(est.feedback), [p.grad for p in net.parameters()]))
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        torch.testing.assert_close(a, b)


def test_fdfa_adam_feedback_tracks_the_jacobian() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4), nn.Linear(4, 3)).double()
    est = build("fdfa", net, seed=3, feedback_lr=0.02, feedback_optimizer="adam")
    x, y = batch(n=32, shape=(6,))
    for _ in range(300):
        est.step(x, y)
    W2, W3 = net[1].weight.detach(), net[2].weight.detach()
    for b, j in zip(est.feedback, [W3 @ W2, W3]):
        assert F.cosine_similarity(b.flatten(), j.flatten(), dim=0) > 0.95


def test_fdfa_feedback_optimizer_state_resumes(tmp_path) -> None:
    """The Adam moments of B go into the estimator state (through a weights_only checkpoint) and come back."""
    torch.manual_seed(0)
    net = build_model("fc-bn", 3, (1, 4, 4), width=7).double()
    x, y = batch(n=16, shape=(1, 4, 4))
    est = build("fdfa", net, seed=2, feedback_lr=0.05, feedback_optimizer="adam")
    for _ in range(3):
        est.step(x, y)
    torch.save(est.state_dict(), tmp_path / "state.pt")
    buffers = [b.clone() for b in net.buffers()]
    est.step(x, y)
    expected = [b.clone() for b in est.feedback] + [p.grad.clone() for p in net.parameters()]

    def resumed(with_optimizer: bool) -> list[torch.Tensor]:
        with torch.no_grad():
            for b, s in zip(net.buffers(), buffers):
                b.copy_(s)
        est2 = build("fdfa", net, seed=99, feedback_lr=0.05, feedback_optimizer="adam")
        state = torch.load(tmp_path / "state.pt", weights_only=True)
        if not with_optimizer:
            state["parts"]["feedback_optimizer._extra_state"] = None
        est2.load_state_dict(state)
        est2.step(x, y)
        return [b.clone() for b in est2.feedback] + [p.grad.clone() for p in net.parameters()]

    for a, b in zip(expected, resumed(True)):
        torch.testing.assert_close(a, b)
    # control: a fresh Adam (no moments, step count 0) moves B differently, so the check above can fail
    assert not all(torch.allclose(a, b) for a, b in zip(expected, resumed(False)))


def test_fdfa_feedback_optimizer_options() -> None:
    net = build_model("mlp", 3, (4,), hidden=(5,))
    with pytest.raises(UsageError, match="feedback-lr"):
        build("fdfa", net, feedback_lr=2.0)
    build("fdfa", net, feedback_lr=2.0, feedback_optimizer="sgd")
    with pytest.raises(UsageError):
        build("fdfa", net, feedback_optimizer="rmsprop")


# ------------------------------------------------------------------- defaults of the public FDFA code (issue 17)


@pytest.mark.parametrize("init", ["kaiming-uniform", "normal"])
def test_dfa_feedback_init_statistics(init: str) -> None:
    """kaiming-uniform (default): U(±√(6/n)), std √(2/n) for n outputs; normal: N(0, 1/classes)."""
    torch.manual_seed(0)
    n, classes = 400, 10
    net = build_model("mlp", classes, (8,), hidden=(n,))
    est = build("dfa", net, seed=3, **({} if init == "kaiming-uniform" else {"feedback_init": init}))
    est.step(torch.randn(16, 8), torch.randint(0, classes, (16,)))
    (b,) = est.feedback
    assert b.shape == (classes, n)
    std = (2 / n) ** 0.5 if init == "kaiming-uniform" else classes**-0.5
    assert abs(float(b.std()) - std) < 0.05 * std, (float(b.std()), std)
    assert abs(float(b.mean())) < 4 * std / (classes * n) ** 0.5
    if init == "kaiming-uniform":
        assert float(b.abs().max()) <= (6 / n) ** 0.5
        assert float(b.abs().max()) > 0.95 * (6 / n) ** 0.5  # uniform: fills its range
    else:
        assert float(b.abs().max()) > 3 * std  # normal: tails beyond any uniform of this std
    with pytest.raises(UsageError):
        build("dfa", net, feedback_init="zeros")


@pytest.mark.parametrize("fast", [True, False])
def test_fdfa_feedback_timing_from_a_zero_start(fast: bool) -> None:
    """B starts at zero. With timing before (default, the public code) the first hidden update is exactly zero;
    with after, the first step already uses the learned B, so it is not."""
    for timing in ["before", "after"]:
        torch.manual_seed(0)
        net = build_model("mlp", 3, (4,), hidden=(5, 6)).double()
        est = build("fdfa", net, seed=1, feedback_lr=0.5, **({} if timing == "before" else {"feedback_timing": timing}))
        if not fast:
            est.fast = None
        est.step(*batch())
        hidden = [p.grad for p in [*net[1].parameters(), *net[3].parameters()]]
        assert all(torch.isfinite(g).all() for g in hidden)
        assert net[5].weight.grad.abs().sum() > 0  # the output layer takes its exact gradient either way
        if timing == "before":
            assert all(torch.all(g == 0) for g in hidden)
        else:
            assert all(g.abs().sum() > 0 for g in hidden)
    with pytest.raises(UsageError):
        build("fdfa", net, feedback_timing="during")


# ------------------------------------------------- fa / dfa / fdfa on user models: a residual CNN, a small ViT


def data(n: int = 6, shape: tuple[int, ...] = (3, 16, 16), classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def nonzero_(model: nn.Module) -> nn.Module:
    """Random biases / norm shifts so that no gradient is trivially zero."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("make", [ResidualCNN, TinyViT])
def test_fa_with_feedback_equal_to_weights_is_backprop(make) -> None:
    torch.manual_seed(0)
    model = nonzero_(make().double())
    model.input_shape = (3, 16, 16)
    x, y = data()
    est = build("fa", model, seed=1)
    kinds = {type(m) for m, _ in est.weights}
    assert nn.Linear in kinds or nn.Conv2d in kinds
    est.step(x, y)
    random_fb = [p.grad.clone() for p in model.parameters()]
    est.feedback = [w.detach().clone() for _, w in est.weights]
    est.step(x, y)
    fa = [p.grad.clone() for p in model.parameters()]
    ref = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), fa, ref):
        torch.testing.assert_close(a, b, msg=name)
    # With random B the first layer's update differs (its signal came through B's), the readout's does not.
    first = next(n for n, _ in model.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert not torch.allclose(random_fb[names.index(first)], ref[names.index(first)])
    torch.testing.assert_close(random_fb[-1], ref[-1])


def test_fa_reaches_every_attention_projection() -> None:
    model = TinyViT().double()
    model.input_shape = (3, 16, 16)
    est = build("fa", model, seed=1)
    fb_of = {id(w) for _, w in est.weights}
    for layer in model.encoder.layers:
        assert id(layer.self_attn.in_proj_weight) in fb_of and id(layer.self_attn.out_proj.weight) in fb_of


def test_dfa_blocks_of_a_residual_cnn_are_local() -> None:
    """Each block's gradient = autograd of ⟨block output, e·B_l⟩ with the block's input detached; readout exact."""
    torch.manual_seed(0)
    model = nonzero_(ResidualCNN().double()).eval()  # eval: batch-norm statistics stay put for the reference
    model.input_shape = (3, 16, 16)
    est = build("dfa", model, seed=1)
    x, y = data()
    est.step(x, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    a = est.anatomy
    # Reference: every block output, then each block's own VJP from its detached input.
    outs: list[torch.Tensor] = []
    with torch.no_grad(), boundaries(a, lambda i, o: outs.append(o) or o):
        logits = model(x)
    e = (logits.softmax(1) - F.one_hot(y, 10).double()) / len(y)
    ref: dict[str, torch.Tensor] = {}
    stem_out = model.stem(x)
    s = [(e @ b).view_as(o) for b, o in zip(est.feedback, outs)]
    pairs = [
        (stem_out, list(model.stem.parameters()), s[0]),
        (model.bn(model.conv(outs[0])), [model.conv.weight, model.conv.bias, model.bn.weight, model.bn.bias], s[1]),
        (model.down(torch.relu(outs[1] + outs[0])), [model.down.weight, model.down.bias], s[2]),
        (model.fc(torch.relu(outs[2]).mean((2, 3))), [model.fc.weight, model.fc.bias], e),
    ]
    names = {id(p): n for n, p in model.named_parameters()}
    for out, params, signal in pairs:
        for p, g in zip(params, torch.autograd.grad(out, params, signal)):
            ref[names[id(p)]] = g
    assert set(ref) == set(got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], msg=n)


def test_inplace_relu_after_a_block_is_handled() -> None:
    """ReLU(inplace=True) after a block boundary would overwrite the output its local backward needs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 3)).double()  # fmt: skip
    x, y = data(shape=(5,), classes=3)
    for method in ("dfa", "fdfa"):
        est = build(method, model, seed=0, blocks=["1", "4"])  # boundaries at the tanh outputs (tanh saves them)
        est.step(x, y)
        feedback = est.feedback[0].clone()  # fdfa's signal uses B from before the step's update
        est.step(x, y)
        assert est._copy_boundaries
        w0 = model[0].weight
        with torch.no_grad():
            a0 = model[0](x)
        signal = (torch.softmax(model(x), 1) - F.one_hot(y, 3).double()) / len(y) @ feedback
        torch.testing.assert_close(w0.grad, ((signal * (1 - a0.tanh() ** 2)).T @ x), msg=method)


@pytest.mark.parametrize("method", ["fa", "dfa", "fdfa"])
@pytest.mark.parametrize("make", [ResidualCNN, TinyViT])
def test_feedback_rules_lower_the_loss_on_user_models(method: str, make) -> None:
    torch.manual_seed(0)
    model = make()
    model.input_shape = (3, 16, 16)
    x, y = data(n=32, classes=4)
    x = x.float()
    est = build(method, model, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad(set_to_none=True)
        losses.append(float(est.step(x, y).loss))
        opt.step()
    assert losses[-1] < 0.7 * losses[0], (method, losses[0], losses[-1])


def test_fdfa_tangents_survive_inplace_ops_after_a_block() -> None:
    """B learns from the tangents u_l as drawn: an in-place ReLU on the block output must not change them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 3)).double()  # fmt: skip
    x, y = data(shape=(5,), classes=3)
    est = build("fdfa", model, seed=0, blocks=["1", "4"])
    drawn: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []
    draw, learn = est._tangent, est.learn_feedback

    def record_draw(i: int, like: torch.Tensor) -> torch.Tensor:
        u = draw(i, like)
        drawn.append(u.clone())
        return u

    def record_learn(y_dot: torch.Tensor, tangents: list[torch.Tensor]) -> None:
        seen.extend(u.clone() for u in tangents)
        learn(y_dot, tangents)

    est._tangent, est.learn_feedback = record_draw, record_learn
    for _ in range(2):
        est.step(x, y)
    assert len(drawn) == len(seen) == 4
    assert all((u < 0).any() for u in drawn)  # the ReLU would have zeroed these entries
    for u, v in zip(drawn, seen):
        torch.testing.assert_close(v, u)


def test_estimator_state_is_modules_and_refuses_an_older_format() -> None:
    """Heads, feedback matrices and B's optimizer live in `parts` (an nn.Module): `state_dict` and `.to()` come from
    PyTorch; a state saved before that is refused with one line."""
    torch.manual_seed(0)
    net = build_model("mlp", 3, (4,), hidden=(5,))
    x, y = batch(shape=(4,))
    est = build("fdfa", net, seed=0, feedback_optimizer="adam")
    est.step(x.float(), y)
    assert {"feedback.0", "feedback_optimizer._extra_state"} <= set(est.parts.state_dict())
    dfa = build("dfa", net, seed=0)
    dfa.step(x.float(), y)
    dfa.parts.double()
    assert len(dfa.feedback) == 1 and dfa.feedback[0].dtype == torch.float64
    with pytest.raises(UsageError, match="older bpfree"):
        dfa.load_state_dict({"generator": dfa.generator.get_state(), "feedback": None})
