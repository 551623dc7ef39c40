"""Lean forward-mode layers (`bpfree.core.forward_mode`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


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


def _math_kernel():  # noqa: ANN202
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _count_lean_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from bpfree.core.forward_mode import _Attention

    calls: list[int] = []
    forward = _Attention.forward
    monkeypatch.setattr(_Attention, "forward", staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a)))
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_tangent", ["qkv", "q", "k", "v"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_lean_attention_matches_the_math_kernel(dtype: torch.dtype, with_tangent: str, scale: float | None,
                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Values, JVP (with and without a reverse graph) and VJP as forward_ad and autograd give through PyTorch's math
    kernel; cross-attention shapes (L != S, value width != key width), so that the query blocks are uneven."""
    import torch.autograd.forward_ad as fwad
    import torch.nn.functional as F

    from bpfree.core.forward_mode import lean_attention

    calls = _count_lean_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (2, 3, 37, 8), "k": (2, 3, 29, 8), "v": (2, 3, 29, 5)}
    primal = {n: torch.randn(s, generator=g, dtype=dtype).requires_grad_() for n, s in shapes.items()}
    tangent = {n: torch.randn(s, generator=g, dtype=dtype) if n in with_tangent else None for n, s in shapes.items()}
    grad_out = torch.randn(2, 3, 37, 5, generator=g, dtype=dtype)

    def run(lean: bool, grad: bool) -> tuple:
        with fwad.dual_level(), _math_kernel(), lean_attention() if lean else torch.enable_grad(), \
                torch.set_grad_enabled(grad):  # fmt: skip
            args = [primal[n] if tangent[n] is None else fwad.make_dual(primal[n], tangent[n]) for n in "qkv"]
            value, jvp = fwad.unpack_dual(F.scaled_dot_product_attention(*args, scale=scale))
        vjp = torch.autograd.grad(value, list(primal.values()), grad_out) if grad else None
        return value, jvp, vjp

    value, jvp, vjp = run(lean=False, grad=True)
    for grad in (True, False):
        lean_value, lean_jvp, lean_vjp = run(lean=True, grad=grad)
        torch.testing.assert_close(lean_value, value)
        torch.testing.assert_close(lean_jvp, jvp)
        assert not lean_jvp.requires_grad  # its arithmetic recorded no reverse graph (it would keep P-sized blocks)
        if grad:
            for a, b in zip(lean_vjp, vjp):
                torch.testing.assert_close(a, b)
    assert len(calls) == 2  # both lean runs took the Function, not PyTorch's path


class _OwnAttention(nn.Module):
    """A user's attention that calls F.scaled_dot_product_attention itself."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def _mha(batch_first: bool) -> nn.Module:
    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(12, 3, batch_first=batch_first)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x if batch_first else x.transpose(0, 1)
            out = self.mha(x, x, x, need_weights=False)[0]
            return out if batch_first else out.transpose(0, 1)

    return SelfAttention()


ATTENTION_MODULES = {
    "mha": lambda: _mha(True),
    "mha-seq-first": lambda: _mha(False),
    "encoder-layer": lambda: nn.TransformerEncoderLayer(12, 3, 24, dropout=0.0, batch_first=True, norm_first=True),
    "own": lambda: _OwnAttention(12, 3),
}


@pytest.mark.parametrize("kind", sorted(ATTENTION_MODULES))
def test_attention_modules_take_the_lean_path(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `tangent_friendly`: nn.MultiheadAttention, nn.TransformerEncoderLayer and a user's own
    F.scaled_dot_product_attention give the values, tangents (weights dual, as fg-w makes them) and gradients of
    the math kernel."""
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call

    from bpfree.core.forward_mode import tangent_friendly

    calls = _count_lean_calls(monkeypatch)
    torch.manual_seed(0)
    model = ATTENTION_MODULES[kind]().double()
    x = torch.randn(4, 10, 12, dtype=torch.float64)
    params = dict(model.named_parameters())
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    results = []
    for lean in (False, True):
        with fwad.dual_level(), _math_kernel(), tangent_friendly(model) if lean else torch.enable_grad():
            duals = {n: fwad.make_dual(p, tangents[n]) for n, p in params.items()}
            value, jvp = fwad.unpack_dual(functional_call(model, duals, (x,)))
        grads = torch.autograd.grad(value, list(params.values()), torch.ones_like(value))
        results.append((value, jvp, grads))
    (value, jvp, grads), (lean_value, lean_jvp, lean_grads) = results
    torch.testing.assert_close(lean_value, value)
    torch.testing.assert_close(lean_jvp, jvp)
    for a, b in zip(lean_grads, grads):
        torch.testing.assert_close(a, b)
    assert len(calls) == 1


@pytest.mark.parametrize("case", ["mask", "causal", "dropout", "functorch"])
def test_attention_the_lean_path_does_not_cover_runs_as_before(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Masks, causality, dropout and functorch transforms go to PyTorch's own call, with the same results."""
    import torch.autograd.forward_ad as fwad
    import torch.nn.functional as F

    from bpfree.core.forward_mode import lean_attention

    calls = _count_lean_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q, k, v, tq = (torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(4))
    options = {"mask": {"attn_mask": torch.rand(6, 6, generator=g, dtype=torch.float64) > 0.3},
               "causal": {"is_causal": True}, "dropout": {"dropout_p": 0.5}, "functorch": {}}[case]  # fmt: skip

    def attend(query: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)  # dropout's mask
        return F.scaled_dot_product_attention(query, k, v, **options)

    def run(lean: bool) -> tuple:
        with _math_kernel(), lean_attention() if lean else torch.enable_grad():
            if case == "functorch":
                return torch.func.jvp(attend, (q,), (tq,))
            with fwad.dual_level():
                return tuple(t.clone() for t in fwad.unpack_dual(attend(fwad.make_dual(q, tq))))

    for a, b in zip(run(lean=True), run(lean=False)):
        torch.testing.assert_close(a, b)
    assert not calls


def test_the_lean_attention_graph_keeps_no_attention_matrix() -> None:
    """What the reverse graph of a forward-mode pass through an encoder layer saves: with the math kernel, matrices
    [batch, heads, L, L]; with the lean path, nothing that large (the check can fail: the first half)."""
    import torch.autograd.forward_ad as fwad

    from bpfree.core.forward_mode import tangent_friendly

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    batch, length = 3, 20  # [3, 2, 20, 20] = 2,400 numbers; an activation [3, 20, 8] = 480
    x = torch.randn(batch, length, 8)

    def largest_saved(lean: bool) -> int:
        sizes = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            sizes.append(t.numel())
            return t

        with fwad.dual_level(), _math_kernel(), tangent_friendly(layer) if lean else torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # fmt: skip
            layer(fwad.make_dual(x, torch.randn_like(x)))
        return max(sizes)

    assert largest_saved(lean=False) >= batch * 2 * length * length
    assert largest_saved(lean=True) <= 3 * batch * length * 8  # the in-projection's q, k, v in one tensor


def test_lean_attention_is_this_threads_only_and_restores_pytorchs_function(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import torch.nn.functional as F

    from bpfree.core.forward_mode import lean_attention

    calls = _count_lean_calls(monkeypatch)
    original = F.scaled_dot_product_attention
    q = torch.randn(1, 2, 5, 4)
    with lean_attention():
        with lean_attention():  # nested: still on after the inner one ends
            pass
        other = threading.Thread(target=lambda: F.scaled_dot_product_attention(q, q, q))
        other.start()
        other.join()
        assert not calls  # the other thread's call took PyTorch's path
        F.scaled_dot_product_attention(q, q, q)
        assert len(calls) == 1
    assert F.scaled_dot_product_attention is original


def test_lean_attention_refuses_a_second_backward_with_a_clear_error() -> None:
    import torch.nn.functional as F

    from bpfree.core.forward_mode import lean_attention

    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    with lean_attention():
        out = F.scaled_dot_product_attention(q, q, q)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.sum().backward()
