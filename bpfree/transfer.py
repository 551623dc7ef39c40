"""Transfer helpers: start a model from a trained backbone, and carve few-shot label subsets.

Used for `--init-from CHECKPOINT` (the backbone's weights are copied, classifier heads stay freshly
initialised) and for few-shot fine-tuning (`per_class`). Label subsets are `bpfree.data.select_classes`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bpfree.errors import UsageError
from bpfree.runfolder import describe_load_error

# Parameter-name prefixes of the task-specific classifier of the models in this package: never transferred.
HEAD_PREFIXES = ("head.", "readout.")


def load_backbone(
    model: nn.Module, source: str | os.PathLike | dict[str, Any], skip: Sequence[str] = HEAD_PREFIXES
) -> list[str]:
    """Copy every tensor of `source` whose name and shape match `model`, except the classifier head.

    `source` is a state dict, a training checkpoint (a dict with a "model" entry) or a path to either.
    Method-owned heads (e.g. the SFF goodness heads, kept in the estimator's state) are not part of the model,
    so a method built after this call starts with new heads. Returns the names that were loaded.
    """
    if not isinstance(source, dict):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"--init-from: cannot read {source}: {describe_load_error(e)}") from None
    state = source.get("model", source)
    own = model.state_dict()
    loaded = []
    for name, tensor in state.items():
        if name.startswith(tuple(skip)) or name not in own or own[name].shape != tensor.shape:
            continue
        with torch.no_grad():
            own[name].copy_(tensor.to(own[name].device, own[name].dtype))
        loaded.append(name)
    if not loaded:
        raise UsageError("--init-from: no parameter of the checkpoint matches this model (different --model?)")
    return loaded


def per_class_indices(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first `n` examples of every class, in data-set order (deterministic, balanced)."""
    if n < 1:
        raise UsageError(f"examples per class must be at least 1, got {n}")
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        keep[(labels == c).nonzero().flatten()[:n]] = True
    return keep.nonzero().flatten()


def per_class(data: Any, n: int) -> Any:
    """The same data set with only the first `n` training examples of each class (test set unchanged).

    `data` is a `bpfree.data` tensor data set (train_x, train_y, test_x, test_y, num_classes, augment).
    """
    idx = per_class_indices(data.train_y, n)
    return type(data)(data.name, data.train_x[idx], data.train_y[idx], data.test_x, data.test_y,
                      data.num_classes, data.augment)
