"""resnet18 and mobilenetv3 (`bpfree.models.resnet`, `bpfree.models.mobilenetv3`): any input size, the paper's sizes."""

from __future__ import annotations

import pytest
import torch

from bpfree.methods import build as build_method
from bpfree.models import build as build_model
from tests.methods.test_forward_forward import tiny


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3-small", "mobilenetv3-large"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_conv_models_take_any_input_and_train_with_bp(name, shape):
    model = tiny(name, shape)
    est = build_method("bp", model)
    x, y = torch.randn(3, *shape), torch.randint(0, 10, (3,))
    r = est.step(x, y)
    assert r.logits.shape == (3, 10) and torch.isfinite(r.loss)
    assert all(p.grad is not None for p in est.trainable())


def test_full_size_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(build_model("resnet18", 10, (3, 32, 32))) == 11_173_962  # the standard CIFAR ResNet18
    # 4 x 2000 ReLU on MNIST with the readout over layers 2-4
    assert count(build_model("ff-mlp", 10, (1, 28, 28))) == 784 * 2000 + 2000 + 3 * 2001 * 2000 + 6001 * 10
