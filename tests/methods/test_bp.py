"""Backprop (`bpfree.methods.bp`): exactly autograd's gradients."""

import torch

from bpfree import methods, models


def test_bp_fills_exactly_backward_gradients():
    torch.manual_seed(0)
    model = models.build("mlp", 10, (1, 8, 8), hidden=(16, 16))
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    result = methods.build("bp", model).step(x, y)
    for p, g in zip(model.parameters(), expected):
        assert torch.equal(p.grad, g)
    assert result.logits.shape == (5, 10) and result.loss.requires_grad is False
