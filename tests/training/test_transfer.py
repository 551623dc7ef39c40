"""Backbones from trained runs (`bpfree.training.transfer`): new heads, class subsets, --init-from."""

from __future__ import annotations

import pytest
import torch

from bpfree.core.errors import UsageError
from bpfree.models import build as build_model
from bpfree.training.transfer import load_backbone, per_class_indices
from tests.methods.test_forward_forward import tiny


def test_load_backbone_keeps_new_heads():
    source = tiny("resnet18")
    target = build_model("resnet18", 5, (1, 12, 12), width=4)
    fresh_head = target.head[-1].weight.clone()
    loaded = load_backbone(target, {"model": source.state_dict()})
    assert loaded and not any(n.startswith("head.") for n in loaded)
    for (name, a), b in zip(target.blocks.state_dict().items(), source.blocks.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(target.head[-1].weight, fresh_head)
    with pytest.raises(UsageError):
        load_backbone(build_model("mlp", 10, (1, 6, 6)), source.state_dict())


def test_per_class_indices_are_balanced():
    y = torch.tensor([0, 1, 1, 2, 0, 1, 2, 2, 0, 0])
    idx = per_class_indices(y, 2)
    assert idx.tolist() == [0, 1, 2, 3, 4, 6]


def test_trainer_classes_and_init_from(tmp_path):
    from bpfree.training.train import TrainConfig, train

    common = dict(method="sff-block", model="resnet18", data="digits", epochs=1, batch_size=50, train_size=100,
                  optimizer="adam", lr=1e-3, model_options={"width": 4})
    first = TrainConfig(**common, classes=(0, 1, 2, 3, 4), out=str(tmp_path / "pre"))
    train(first, show_progress=False)
    second = TrainConfig(**common, classes=(5, 6, 7, 8, 9), init_from=str(tmp_path / "pre" / "checkpoint.pt"),
                         out=str(tmp_path / "fine"))
    from bpfree.training.train import Run

    run = Run(second, show_progress=False)
    assert run.data.num_classes == 5 and set(run.data.train_y.tolist()) <= set(range(5))
    assert run.data.num_train == 100
    pre = torch.load(tmp_path / "pre" / "checkpoint.pt", weights_only=True)
    for name, tensor in run.model.blocks.state_dict().items():
        assert torch.equal(tensor, pre["model"]["blocks." + name]), name
    # the SFF heads are new: not the pre-trained ones
    assert not torch.equal(run.estimator.heads[0].weight, pre["estimator"]["parts"]["heads.0.weight"])
