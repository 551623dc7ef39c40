import gzip
import os
import struct
from pathlib import Path

import pytest
import torch

# Tests never reach for the network, and stay on one thread each: the CI machine has two cores.
os.environ.setdefault("BPFREE_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def digits():
    from bpfree.data import load

    return load("digits")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The 8x8 digits stored as MNIST IDX files: subprocesses (data-parallel ranks, runs killed on purpose) load
    them without importing scikit-learn (seconds of start-up per process on the two-core test machine)."""
    from bpfree.data import load
    from bpfree.data.datasets import MNIST_FILES

    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    digits = load("digits")
    arrays = [digits.train_x[:256], digits.train_y[:256], digits.test_x[:120], digits.test_y[:120]]
    for name, a in zip(MNIST_FILES, arrays):
        if a.dim() > 1:  # back from the normalised floats to bytes
            a = ((a[:, 0] * 0.4 + 0.3) * 255).round().clamp(0, 255)
        a = a.to(torch.uint8).numpy()
        with gzip.open(raw / name, "wb") as f:
            f.write(struct.pack(">I", 2051 if a.ndim == 3 else 2049) + struct.pack(f">{a.ndim}I", *a.shape)
                    + a.tobytes())
    return root
