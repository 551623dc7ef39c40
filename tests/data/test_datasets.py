"""The data sets by name (`bpfree.data.datasets`): layouts, the data root, batching, class subsets."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bpfree.core.errors import UsageError
from bpfree.data import TensorData, load
from bpfree.data.datasets import random_crop_flip, select_classes
from tests.data.test_files import make_mnist, write_cifar


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


def test_cifar_layout(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    data = load("cifar10", root=tmp_path, augment=True)
    assert data.input_shape == (3, 32, 32) and data.num_train == 30
    x, y = next(data.train_batches(4, torch.Generator().manual_seed(0)))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


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


REAL = os.environ.get("BPFREE_DATA")


@pytest.mark.slow
@pytest.mark.skipif(not (REAL and (Path(REAL) / "MNIST" / "raw").exists()), reason="real data not laid out")
def test_real_mnist_and_cifar():
    mnist = load("mnist", root=REAL)
    assert (mnist.num_train, len(mnist.test_y)) == (60000, 10000)
    assert torch.bincount(mnist.train_y).min() > 5000
    cifar = load("cifar10", root=REAL)
    assert (cifar.num_train, len(cifar.test_y), cifar.input_shape) == (50000, 10000, (3, 32, 32))


def numbered(n: int = 100, classes: int = 4) -> TensorData:
    """Training example i is the image filled with i, so every held-out or kept example can be identified."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    y = torch.arange(n) % classes
    return TensorData("numbered", x, y, x[:10], y[:10], classes)


def ids(x: torch.Tensor) -> set[int]:
    return {int(v) for v in x[:, 0, 0, 0]}


def test_hold_out_is_disjoint_fixed_and_keeps_the_training_order():
    data = numbered()
    split = data.hold_out(30)
    val, train = ids(split.val_x), ids(split.train_x)
    assert len(val) == split.num_val == 30 and len(train) == split.num_train == 70
    assert val.isdisjoint(train) and val | train == set(range(100))
    assert split.train_x[:, 0, 0, 0].tolist() == sorted(train)  # the rest keep their order: --train-size is a prefix
    assert torch.equal(split.val_y, split.val_x[:, 0, 0, 0].long() % 4)  # labels travel with their images
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(numbered().hold_out(30).val_x, split.val_x)
    # A subset of the training examples keeps the validation set.
    sub = split.subset(20)
    assert torch.equal(sub.val_x, split.val_x) and ids(sub.train_x) <= train
    assert list(split.val_batches(7))[-1][0].shape[0] == 30 % 7
    with pytest.raises(Exception, match="--val-split must be in 1..99"):
        data.hold_out(100)
