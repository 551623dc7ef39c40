"""fa / dfa / fdfa on ordinary user models through the anatomy: a residual CNN with batch norm and a small ViT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_anatomy import ResidualCNN, TinyViT
from torch import nn

from bpfree.core.anatomy import boundaries
from bpfree.core.attention import attention_forward
from bpfree.methods import build

torch.set_num_threads(1)


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


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", [None, "bool", "float"])
def test_attention_forward_matches_multihead_attention(batch_first: bool, masks: str | None) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=6 if masks else None).double()
    q = torch.randn(3, 5, 8, dtype=torch.float64)
    k = torch.randn(3, 4, 6 if masks else 8, dtype=torch.float64)
    v = torch.randn(3, 4, 8, dtype=torch.float64)
    if not masks:
        k, v = q, q
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    opts = {}
    if masks:
        pad = torch.tensor([[False] * 3 + [True]] * 3)
        attn = torch.tensor([[False, True, False, False]] * 5)  # with the padding: keys 0 and 2 remain
        if masks == "float":
            pad, attn = pad.double() * -1e9, attn.double() * -3.0
        opts = {"key_padding_mask": pad, "attn_mask": attn}
    for need in (True, False):
        ref, w_ref = mha(q, k, v, need_weights=need, **opts)
        got, w_got = attention_forward(mha, q, k, v, need_weights=need, **opts)
        torch.testing.assert_close(got, ref)
        if need:
            torch.testing.assert_close(w_got, w_ref)


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


@pytest.mark.parametrize("train", [True, False])
def test_tangent_friendly_layers_change_nothing_but_speed(train: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values, forward-mode tangents, gradients and batch-norm statistics as with PyTorch's own modules."""
    import copy

    import torch.autograd.forward_ad as fwad

    from bpfree.core.forward_mode import tangent_friendly

    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding="same", dilation=2),
                      nn.Conv2d(4, 4, 3, stride=2, padding="valid"), nn.Flatten(2, 3), nn.Conv1d(4, 2, 3),
                      nn.BatchNorm1d(2)).double().train(train)  # fmt: skip
    from bpfree.core.forward_mode import _Conv

    calls = []
    forward = _Conv.forward
    monkeypatch.setattr(_Conv, "forward", staticmethod(lambda ctx, *args: calls.append(1) or forward(ctx, *args)))
    b = copy.deepcopy(a)
    x, t = torch.randn(5, 3, 7, 7, dtype=torch.float64), torch.randn(5, 3, 7, 7, dtype=torch.float64)
    with fwad.dual_level():
        pa, ta = fwad.unpack_dual(a(fwad.make_dual(x, t)))
    with fwad.dual_level(), tangent_friendly(b):
        pb, tb = fwad.unpack_dual(b(fwad.make_dual(x, t)))
    assert len(calls) == 4  # every convolution ran the cheaper Function, the "same"-padded one included
    torch.testing.assert_close(pb, pa)
    torch.testing.assert_close(tb, ta)
    for s, r in zip(b.buffers(), a.buffers()):
        torch.testing.assert_close(s, r)
    g = torch.randn_like(pa)
    for s, r in zip(torch.autograd.grad(pb, list(b.parameters()), g), torch.autograd.grad(pa, list(a.parameters()), g)):
        torch.testing.assert_close(s, r)


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
