"""The model anatomy: layers and blocks found on shipped models and on ordinary user-written modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bpfree import methods, models
from bpfree.core.anatomy import boundaries, describe, pool, pooled_positions, positions_last
from bpfree.core.errors import UsageError
from tests.user_models import ResidualCNN, TinyViT


def test_sequential_blocks_group_each_layer_with_what_follows():
    a = describe(models.build("fc-bn", 10, (1, 8, 8), layers=2, width=16))
    assert [b.name for b in a.blocks] == ["1", "4"]
    assert [type(m).__name__ for m in a.blocks[0].modules] == ["Flatten", "Linear", "BatchNorm1d", "ReLU"]
    assert a.block_shapes == [(16,), (16,)]
    assert {id(p) for p in a.readout_parameters()} == {id(p) for p in list(a.model.parameters())[-2:]}


def test_declared_blocks_are_used():
    model = models.build("resnet18", 10, (3, 8, 8), width=4)
    a = describe(model)
    assert [b.exit for b in a.blocks] == list(model.blocks)
    assert a.block_widths() == [4, 4, 4, 8, 8, 16, 16, 32, 32]


def test_generic_blocks_follow_the_call_order():
    a = describe(ResidualCNN(), (3, 16, 16))
    assert [b.name for b in a.blocks] == ["stem", "conv", "down"]
    assert a.blocks[1].exit is a.model.bn  # a layer-free module after a layer ends that layer's block
    assert a.block_shapes == [(8, 16, 16), (8, 16, 16), (16, 8, 8)]


def test_transformer_encoder_is_opened_into_its_layers():
    vit = TinyViT()
    a = describe(vit, (3, 16, 16))
    assert [b.name for b in a.blocks] == ["patch", "encoder.layers.0", "encoder.layers.1"]
    assert a.block_shapes[1:] == [(16, 32), (16, 32)]
    assert a.block_widths() == [32, 32, 32]
    assert any(isinstance(m, nn.MultiheadAttention) for _, m in a.layers)
    assert vit.pos in a.readout_parameters()  # used between blocks: it takes the next boundary's signal


def test_named_blocks_and_bad_names():
    a = describe(ResidualCNN(), (3, 16, 16), blocks=["stem", "down"])
    assert [b.name for b in a.blocks] == ["stem", "down"]
    with pytest.raises(UsageError, match="no submodule 'nope'"):
        describe(ResidualCNN(), (3, 16, 16), blocks=["nope"])


def test_a_block_that_ends_twice_is_refused():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), relu, nn.Linear(4, 4), relu, nn.Linear(4, 2))
    with pytest.raises(UsageError, match="ends 2 times"):
        describe(model, (4,))


def test_unknown_input_shape_is_a_usage_error():
    with pytest.raises(UsageError, match="input shape is unknown"):
        describe(ResidualCNN())


def test_boundaries_can_replace_block_outputs():
    model = ResidualCNN()
    a = describe(model, (3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    seen = []
    with boundaries(a, lambda i, out: seen.append(i) or torch.zeros_like(out)):
        logits = model(x)
    assert seen == [0, 1, 2]
    assert torch.allclose(logits, model.fc.bias.expand(2, -1))


def test_pool_and_positions():
    assert pool(torch.ones(2, 5, 3, 3)).shape == (2, 5)
    assert pool(torch.ones(2, 7, 5)).shape == (2, 5)
    # what pool averages over: sum over those positions / their count gives pool
    for h in (torch.randn(2, 5, 3, 3), torch.randn(2, 7, 5), torch.randn(2, 5)):
        summed = h if h.dim() == 2 else h.sum(1) if h.dim() == 3 else h.flatten(2).sum(-1)
        assert torch.allclose(summed / pooled_positions(h), pool(h))
    assert positions_last(torch.ones(2, 5, 3, 4)).shape == (2, 12, 5)
    with pytest.raises(UsageError):
        positions_last(torch.ones(2, 5))


class FunctionalMix(nn.Module):
    """A user's net that uses a layer's weight directly, as LocalMixer's token mixing does."""

    input_shape = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.a, self.mix, self.b, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = torch.relu(torch.nn.functional.linear(h, self.mix.weight, self.mix.bias))
        return self.out(torch.relu(self.b(h)))


@pytest.mark.parametrize("method", ["fa", "fg-a", "l-fa", "lg-fa", "lg-fg-a", "lg-fg-w"])
def test_rules_that_replace_layer_forwards_refuse_a_layer_used_through_its_weight(method: str) -> None:
    """Before, fg-a / lg-fg-* left `mix` with a zero gradient and fa sent its error back through W, silently."""
    blocks = None if method in ("fa", "fg-a") else ["a", "b"]
    with pytest.raises(UsageError, match="uses the weight of layer 'mix' directly"):
        methods.build(method, FunctionalMix(), blocks=blocks)


@pytest.mark.parametrize("method", ["bp", "dfa", "fg-w", "l-bp", "sff-block"])
def test_rules_that_differentiate_the_forward_take_a_layer_used_through_its_weight(method: str) -> None:
    blocks = None if method in ("bp", "fg-w") else ["a", "b"]
    model = FunctionalMix()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    methods.build(method, model, blocks=blocks).step(x, y)
    assert model.mix.weight.grad is not None and model.mix.weight.grad.abs().sum() > 0
