"""LocalMixer (`bpfree.models.localmixer`): the local heads' input, sizes, the readout."""

from __future__ import annotations

import pytest
import torch

from bpfree.core.errors import UsageError
from bpfree.methods import build as build_method
from bpfree.models import build, count_parameters
from tests.fastpaths.test_localmixer_local import naive_head_input, naive_slot_norm, tiny

pytestmark = pytest.mark.usefixtures("float64_one_thread")  # exactness checks on tiny tensors


def test_head_input_normalises_each_token_per_group_before_pooling():
    model = tiny(groups=2)
    h = torch.randn(3, 4, 8) * 3 + 1
    torch.testing.assert_close(model.head_input(h), naive_head_input(h, 2))
    # not the old definition (pool, then normalise over all channels): the test can fail
    pooled_first = naive_slot_norm(h.mean(1))
    assert not torch.allclose(model.head_input(h), pooled_first, atol=1e-3)
    # the readout (as the authors' last_layer_ln): pool over patches, then normalise over all channels
    torch.testing.assert_close(model.classify(model.pooled(h)), model.readout(pooled_first))


def test_parameter_counts_match_the_paper():
    counts = {
        ("localmixer-s1-1", (1, 28, 28)): 272e3,
        ("localmixer-m1-16", (1, 28, 28)): 429e3,
        ("localmixer-m8-16", (3, 32, 32)): 919e3,
        ("localmixer-l8-64", (3, 32, 32)): 13.1e6,
    }
    for (name, shape), paper in counts.items():
        n = count_parameters(build(name, 10, shape))
        assert abs(n - paper) / paper < 0.01, (name, n, paper)
    with pytest.raises(UsageError):
        build("localmixer-m8-16", 10, (3, 30, 30))


def test_readout_starts_at_zero_and_bp_trains_end_to_end():
    torch.manual_seed(0)
    model = build("localmixer-m8-16", 3, (1, 4, 4), blocks=2, grid=2, channels=8, groups=2)
    x = torch.randn(5, 1, 4, 4)
    assert torch.all(model(x) == 0)
    with torch.no_grad():
        model.readout.weight.normal_()
    est = build_method("bp", model)
    est.step(x, torch.tensor([0, 1, 2, 0, 1]))
    assert model.blocks[0].channel.weight.grad.abs().sum() > 0  # gradient flows through the readout
    assert model.heads[0].weight.grad.abs().sum() == 0  # local heads take no part in plain forward
