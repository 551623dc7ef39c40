"""Parsers of the standard files (`bpfree.data.files`) on small files written here; errors name the file. The
writers here make those files for the other data tests."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from bpfree.core.errors import UsageError
from bpfree.data import load
from bpfree.data.datasets import MNIST_FILES
from bpfree.data.files import read_cifar_batch, read_idx


def write_idx(path, array, magic=None, truncate=0):
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) - truncate])


def make_mnist(root, n_train=20, n_test=10, folder="MNIST"):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n_train, 28, 28)), rng.integers(0, 10, n_train),
              rng.integers(0, 256, (n_test, 28, 28)), rng.integers(0, 10, n_test)]
    for name, array in zip(MNIST_FILES, arrays):
        write_idx(raw / name, array)
    return arrays


def test_idx_roundtrip(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "a.gz", images)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), images)


def test_idx_truncated_names_file(tmp_path):
    write_idx(tmp_path / "t.gz", np.zeros((5, 28, 28)), truncate=7)
    with pytest.raises(UsageError, match=r"t\.gz is truncated"):
        read_idx(tmp_path / "t.gz")


def test_idx_wrong_magic_names_file(tmp_path):
    write_idx(tmp_path / "m.gz", np.zeros((5, 28, 28)), magic=1234)
    with pytest.raises(UsageError, match=r"m\.gz is not an IDX file"):
        read_idx(tmp_path / "m.gz")


def test_idx_not_gzip(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"definitely not gzip data")
    with pytest.raises(UsageError, match=r"x\.gz"):
        read_idx(tmp_path / "x.gz")


def write_cifar(folder, n=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_corrupt_names_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UsageError, match="data_batch_3"):
        read_cifar_batch(folder / "data_batch_3")
    with pytest.raises(UsageError, match="data_batch_3"):
        load("cifar10", root=tmp_path)


