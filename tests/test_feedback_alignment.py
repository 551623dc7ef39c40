"""FA, DFA and FDFA against their defining formulas, hand-computed on tiny nets with the estimator's own B."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree.core.errors import UsageError
from bpfree.methods import build
from bpfree.models import build as build_model

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
    est = build("fdfa", net, seed=7, feedback_lr=1.0)
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


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.mark.parametrize(
    "method,model,kw",
    [("fa", "fc-bn", {"width": 64}), ("dfa", "fc-bn", {"width": 64}), ("fdfa", "fc-bn", {"width": 64}),
     ("fa", "cnn-small", {}), ("dfa", "cnn-small", {}), ("fdfa", "cnn-small", {})],
)  # fmt: skip
def test_learns_digits(digits, method: str, model: str, kw: dict) -> None:
    xtr, ytr, xte, yte = digits
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


def test_models_shapes() -> None:
    assert build_model("fc-bn", 10, (1, 28, 28))(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    n_hidden = sum(isinstance(m, nn.BatchNorm1d) for m in build_model("fc-bn", 10, (1, 28, 28), layers=3))
    assert n_hidden == 3
    for shape, flat in [((1, 28, 28), 640), ((3, 32, 32), 1000), ((1, 8, 8), 160)]:
        net = build_model("cnn-small", 10, shape)
        assert net[7].in_features == flat and net(torch.zeros(2, *shape)).shape == (2, 10)


# ------------------------------------------------------------------------------- FA on LocalMixer: fa, l-fa, lg-fa


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


@pytest.mark.parametrize("method", ["fa", "l-fa", "lg-fa", "dfa"])
def test_mixer_fa_learns_digits(digits, method: str) -> None:
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    net = build_model("localmixer-m1-16", 10, (1, 8, 8), channels=32, groups=4)
    est = build(method, net, seed=0)
    opt = torch.optim.SGD(est.trainable(), lr=0.05, momentum=0.9)
    acc = fit_and_score(net, est, opt, xtr, ytr, xte, yte)
    assert acc > 0.5, f"{method} on localmixer: test accuracy {acc:.2f} (chance 0.10)"


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
