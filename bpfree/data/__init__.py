"""Data sets held as tensors (or streamed from disk for image folders), batched by index slicing.

`load(name, ...)` returns an object with `num_classes`, `input_shape`, `train_batches(batch_size, generator)`,
`test_batches(batch_size)` and `num_train`.
"""

from bpfree.data.datasets import DATASETS, TensorData, load, resolve_root, select_classes

__all__ = ["DATASETS", "TensorData", "load", "resolve_root", "select_classes"]
