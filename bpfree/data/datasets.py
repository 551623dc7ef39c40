"""The registered data sets. Everything but image folders is held in memory as normalised float tensors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bpfree.core.errors import UsageError
from bpfree.core.group import shard
from bpfree.data.files import extract_tar, fetch, read_cifar_batch, read_idx

Batch = tuple[torch.Tensor, torch.Tensor]
VALIDATION_SEED = 20221006  # fixed, not --seed: all runs of a data set share one validation split


def resolve_root(root: str | os.PathLike | None) -> Path:
    """--data-root, else $BPFREE_DATA, else ./data."""
    return Path(root or os.environ.get("BPFREE_DATA") or "data")


def data_folder(root: str | os.PathLike | None) -> Path:
    """The resolved data root, refused if it names something that is not a folder."""
    path = resolve_root(root)
    if path.exists() and not path.is_dir():
        source = "--data-root" if root else "$BPFREE_DATA" if os.environ.get("BPFREE_DATA") else "./data"
        raise UsageError(f"{source} {path} is a file, not a folder of data sets")
    return path


def check_labels(labels: torch.Tensor, num_classes: int, where: str | Path) -> None:
    """Every label must name one of the data set's classes (a damaged file can hold any byte)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise UsageError(f"{where}: label {int(bad[0])} is out of range 0..{num_classes - 1} "
                         f"({len(bad)} such labels)")


class TensorData:
    """A data set held as tensors. Batches are index slices; augmentation runs on whole batches."""

    def __init__(
        self,
        name: str,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        num_classes: int,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        val_x: torch.Tensor | None = None,
        val_y: torch.Tensor | None = None,
    ):
        self.name = name
        self.train_x, self.train_y = train_x, train_y
        self.test_x, self.test_y = test_x, test_y
        self.num_classes = num_classes
        self.augment = augment
        self.val_x, self.val_y = val_x, val_y  # held-out training examples (see `hold_out`), never augmented

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    def num_train_batches(self, batch_size: int) -> int:
        return -(-self.num_train // batch_size)

    def subset(self, n: int) -> TensorData:
        """The first `n` training examples (the test set unchanged)."""
        return TensorData(self.name, self.train_x[:n], self.train_y[:n], self.test_x, self.test_y,
                          self.num_classes, self.augment, self.val_x, self.val_y)

    def hold_out(self, n: int) -> TensorData:
        """Move `n` training examples into a validation set; the rest stay training examples, in their order.

        Which examples: the first `n` of a permutation drawn from a constant seed (VALIDATION_SEED), so every run
        with the same data, --classes and `n` holds out the same examples whatever its --seed, method or
        --train-size. A random draw rather than the last `n`: a file sorted by class or writer would give a
        lopsided validation set.
        """
        if n < 1 or n >= self.num_train:
            raise UsageError(f"--val-split must be in 1..{self.num_train - 1} (the {self.num_train} training "
                             f"examples of {self.name}), got {n}")
        held = torch.zeros(self.num_train, dtype=torch.bool)
        held[torch.randperm(self.num_train, generator=torch.Generator().manual_seed(VALIDATION_SEED))[:n]] = True
        return TensorData(self.name, self.train_x[~held], self.train_y[~held], self.test_x, self.test_y,
                          self.num_classes, self.augment, self.train_x[held], self.train_y[held])

    @property
    def num_val(self) -> int:
        return 0 if self.val_y is None else len(self.val_y)

    def with_classes(self, classes: Sequence[int]) -> TensorData:
        """Only the examples of `classes` (checked by `select_classes`), relabelled 0..k-1 in that order."""
        remap = torch.full((self.num_classes,), -1, dtype=torch.int64)
        remap[torch.tensor(list(classes))] = torch.arange(len(classes))

        def keep(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            mask = remap[y] >= 0
            return x[mask], remap[y[mask]]

        return TensorData(self.name, *keep(self.train_x, self.train_y), *keep(self.test_x, self.test_y),
                          len(classes), self.augment)

    def train_batches(
        self, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1
    ) -> Iterator[Batch]:
        """Shuffled batches. With world_size > 1, each rank gets its share of every global batch
        (`bpfree.core.group.shard`), augmented as the whole batch is: the same images as on one process."""
        order = torch.randperm(self.num_train, generator=generator)
        for start in range(0, self.num_train, batch_size):
            idx = order[start : start + batch_size]
            x, y = self.train_x[idx], self.train_y[idx]
            if self.augment is not None:
                x = self.augment(x, generator)
            if world_size > 1:
                rows = shard(len(idx), rank, world_size)
                x, y = x[rows.start : rows.stop], y[rows.start : rows.stop]
            yield x, y

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, len(self.test_y), batch_size):
            yield self.test_x[start : start + batch_size], self.test_y[start : start + batch_size]

    def val_batches(self, batch_size: int) -> Iterator[Batch]:
        """The held-out validation examples in order (none without `hold_out`)."""
        for start in range(0, self.num_val, batch_size):
            yield self.val_x[start : start + batch_size], self.val_y[start : start + batch_size]


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Pad-`pad` random crop and horizontal flip, for the whole batch at once (one gather, no Python loop)."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(0), cols) + dx[:, None]
    rows = torch.arange(h) + dy[:, None]
    i = torch.arange(n)[:, None, None, None]
    ch = torch.arange(c)[None, :, None, None]
    return padded[i, ch, rows[:, None, :, None], cols[:, None, None, :]]


def _normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def _missing(root: Path, folder: str, files: Sequence[str]) -> UsageError:
    return UsageError(
        f"data files missing: expected {', '.join(files)} in {root / folder} "
        f"(set --data-root or $BPFREE_DATA; no download was possible)"
    )


MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MIRRORS = {
    "MNIST": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "FashionMNIST": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
}
CIFAR_URL = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _idx_family(folder: str, mean: float, std: float) -> Callable[[Path, bool], TensorData]:
    def load_family(root: Path, augment: bool) -> TensorData:
        raw = root / folder / "raw"
        missing = [f for f in MNIST_FILES if not (raw / f).exists()]
        if missing:
            base, sums = MIRRORS[folder]
            for f in missing:
                fetch(base + f, raw / f, sums[f])
            if any(not (raw / f).exists() for f in MNIST_FILES):
                raise _missing(root, f"{folder}/raw", MNIST_FILES)
        arrays = [read_idx(raw / f, ndim=3 if "images" in f else 1) for f in MNIST_FILES]
        for images, labels, f in ((arrays[0], arrays[1], MNIST_FILES[0]), (arrays[2], arrays[3], MNIST_FILES[2])):
            if len(images) != len(labels):
                raise UsageError(f"{raw / f}: {len(images)} images but {len(labels)} labels")
        if arrays[0].shape[1:] != arrays[2].shape[1:]:
            raise UsageError(f"{raw}: training images are {'x'.join(map(str, arrays[0].shape[1:]))} pixels but "
                             f"test images {'x'.join(map(str, arrays[2].shape[1:]))}")
        labels = [torch.from_numpy(arrays[i].astype(np.int64)) for i in (1, 3)]
        check_labels(labels[0], 10, raw / MNIST_FILES[1])
        check_labels(labels[1], 10, raw / MNIST_FILES[3])
        if augment:
            raise UsageError(f"--augment is only available for cifar10, not {folder}")
        return TensorData(
            folder.lower().replace("fashionmnist", "fashion-mnist"),
            _normalise(arrays[0], [mean], [std]), labels[0], _normalise(arrays[2], [mean], [std]), labels[1], 10,
        )

    return load_family


def load_cifar10(root: Path, augment: bool) -> TensorData:
    folder = root / "cifar-10-batches-py"
    if any(not (folder / f).exists() for f in CIFAR_FILES):
        archive = root / "cifar-10-python.tar.gz"
        if archive.exists() or fetch(CIFAR_URL[0], archive, CIFAR_URL[1], timeout=30):
            extract_tar(archive, root)
        if any(not (folder / f).exists() for f in CIFAR_FILES):
            raise _missing(root, "cifar-10-batches-py", CIFAR_FILES)
    parts = [read_cifar_batch(folder / f) for f in CIFAR_FILES]
    for part, f in zip(parts, CIFAR_FILES):
        check_labels(torch.from_numpy(part[1]), 10, folder / f)
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = np.concatenate([p[1] for p in parts[:5]])
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    return TensorData(
        "cifar10", _normalise(train_x, mean, std), torch.from_numpy(train_y),
        _normalise(parts[5][0], mean, std), torch.from_numpy(parts[5][1]), 10,
        augment=random_crop_flip if augment else None,
    )


def load_digits(root: Path, augment: bool) -> TensorData:
    """scikit-learn's bundled 8x8 digits (1,797 images): works offline with no data directory."""
    from sklearn.datasets import load_digits as sk_digits

    if augment:
        raise UsageError("--augment is only available for cifar10, not digits")
    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # fixed split
    images, labels = images[order], labels[order]
    images = (images - 0.3) / 0.4  # roughly zero mean, unit variance
    n_train = 1437  # an 80 / 20 split
    return TensorData("digits", images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], 10)


DATASETS: dict[str, Callable[[Path, bool], TensorData]] = {
    "digits": load_digits,
    "mnist": _idx_family("MNIST", 0.1307, 0.3081),
    "fashion-mnist": _idx_family("FashionMNIST", 0.2860, 0.3530),
    "cifar10": load_cifar10,
}


def select_classes(data: Any, classes: Sequence[int]) -> Any:
    """Keep only the given classes, relabelled 0..len(classes)-1 in the order given (tensor data sets and image
    folders alike; an image folder's labels are the indices of its sorted class-folder names)."""
    classes = list(classes)
    if len(set(classes)) != len(classes) or any(c < 0 or c >= data.num_classes for c in classes):
        raise UsageError(f"--classes must be distinct labels in 0..{data.num_classes - 1}, got {classes}")
    if len(classes) < 2:  # one class: every prediction is right, the model learns nothing
        raise UsageError(f"--classes needs at least two classes, got {classes}")
    return data.with_classes(classes)


def load(
    name: str,
    root: str | os.PathLike | None = None,
    train_size: int | None = None,
    augment: bool = False,
    image_size: int = 224,
    classes: Sequence[int] | None = None,
) -> TensorData:
    """The data set `name` (or `imagefolder:PATH`), only the labels `classes` (relabelled 0..k-1) if given, then
    its first `train_size` training examples if given."""
    if name.startswith("imagefolder:"):
        from bpfree.data.imagefolder import ImageFolderData

        data = ImageFolderData(Path(name.split(":", 1)[1]), image_size=image_size, augment=augment)
    else:
        if name not in DATASETS:
            import difflib

            close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(
                f"unknown data set {name!r}{hint} (choose from: {', '.join(DATASETS)}, imagefolder:PATH)"
            )
        data = DATASETS[name](data_folder(root) if name != "digits" else resolve_root(root), augment)
    if classes:
        data = select_classes(data, classes)
    if train_size is not None:
        if train_size < 1:
            raise UsageError(f"--train-size must be at least 1, got {train_size}")
        data = data.subset(train_size)
    return data
