"""The feedback-alignment families' models (`bpfree.models.feedback_nets`): fc-bn and cnn-small."""

from __future__ import annotations

import torch
from torch import nn

from bpfree.models import build as build_model


def test_models_shapes() -> None:
    assert build_model("fc-bn", 10, (1, 28, 28))(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    n_hidden = sum(isinstance(m, nn.BatchNorm1d) for m in build_model("fc-bn", 10, (1, 28, 28), layers=3))
    assert n_hidden == 3
    for shape, flat in [((1, 28, 28), 640), ((3, 32, 32), 1000), ((1, 8, 8), 160)]:
        net = build_model("cnn-small", 10, shape)
        assert net[7].in_features == flat and net(torch.zeros(2, *shape)).shape == (2, 10)
