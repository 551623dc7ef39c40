"""Parsers of the standard files (on small files written here), errors naming the file, batching."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bpfree.core.errors import UsageError
from bpfree.data import load
from bpfree.data.datasets import MNIST_FILES, random_crop_flip, select_classes
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


def test_mnist_layout_loads_and_normalises(tmp_path):
    arrays = make_mnist(tmp_path)
    data = load("mnist", root=tmp_path)
    assert data.input_shape == (1, 28, 28) and data.num_train == 20 and len(data.test_y) == 10
    assert torch.equal(data.train_y, torch.from_numpy(arrays[1].astype(np.int64)))
    expected = (arrays[0][3] / 255.0 - 0.1307) / 0.3081
    assert torch.allclose(data.train_x[3, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_fashion_mnist_layout(tmp_path):
    make_mnist(tmp_path, folder="FashionMNIST")
    assert load("fashion-mnist", root=tmp_path).num_train == 20


def test_missing_files_one_line(tmp_path):
    with pytest.raises(UsageError) as e:
        load("mnist", root=tmp_path)
    message = str(e.value)
    assert "\n" not in message and "train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "MNIST" / "raw") in message


def test_env_root(tmp_path, monkeypatch):
    make_mnist(tmp_path)
    monkeypatch.setenv("BPFREE_DATA", str(tmp_path))
    assert load("mnist").num_train == 20


def write_cifar(folder, n=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar_layout(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    data = load("cifar10", root=tmp_path, augment=True)
    assert data.input_shape == (3, 32, 32) and data.num_train == 30
    x, y = next(data.train_batches(4, torch.Generator().manual_seed(0)))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def test_cifar_corrupt_names_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UsageError, match="data_batch_3"):
        read_cifar_batch(folder / "data_batch_3")
    with pytest.raises(UsageError, match="data_batch_3"):
        load("cifar10", root=tmp_path)


def test_unknown_data_suggests():
    with pytest.raises(UsageError, match="did you mean 'mnist'"):
        load("mnsit")


def test_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = random_crop_flip(x, torch.Generator().manual_seed(3), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # every output is some window of the padded image, possibly mirrored
        windows = [padded[i, 0, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i, 0], w) or torch.equal(out[i, 0], w.flip(-1)) for w in windows)


def test_batches_cover_data_once(digits):
    seen = torch.cat([y for _, y in digits.train_batches(100, torch.Generator().manual_seed(0))])
    assert len(seen) == digits.num_train
    assert torch.equal(seen.sort().values, digits.train_y.sort().values)


def test_train_size_and_classes(digits):
    assert load("digits", train_size=50).num_train == 50
    sub = select_classes(digits, [3, 7])
    assert sub.num_classes == 2 and set(sub.train_y.tolist()) == {0, 1}
    with pytest.raises(UsageError):
        select_classes(digits, [3, 3])
    with pytest.raises(UsageError):
        load("digits", train_size=0)


def test_imagefolder_streams_cropped_batches(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    data = load(f"imagefolder:{tmp_path}", image_size=16)
    assert data.num_classes == 2 and data.input_shape == (3, 16, 16) and data.num_train == 6
    x, y = next(data.train_batches(4, torch.Generator().manual_seed(0)))
    assert x.shape == (4, 3, 16, 16) and set(y.tolist()) <= {0, 1}
    xs = torch.cat([x for x, _ in data.test_batches(4)])
    assert xs.shape == (6, 3, 16, 16)


def test_imagefolder_missing_split(tmp_path):
    with pytest.raises(UsageError, match="train"):
        load(f"imagefolder:{tmp_path}")


REAL = os.environ.get("BPFREE_DATA")


@pytest.mark.skipif(not (REAL and (Path(REAL) / "MNIST" / "raw").exists()), reason="real data not laid out")
def test_real_mnist_and_cifar():
    mnist = load("mnist", root=REAL)
    assert (mnist.num_train, len(mnist.test_y)) == (60000, 10000)
    assert torch.bincount(mnist.train_y).min() > 5000
    cifar = load("cifar10", root=REAL)
    assert (cifar.num_train, len(cifar.test_y), cifar.input_shape) == (50000, 10000, (3, 32, 32))
