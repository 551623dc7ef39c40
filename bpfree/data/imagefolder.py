"""Image-folder data sets (ImageNet's layout: ROOT/train/CLASS/*.jpg, ROOT/val/CLASS/*.jpg), streamed from disk
by a DataLoader with worker processes: too large for memory is the normal case."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bpfree.core.errors import UsageError
from bpfree.core.group import shard

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics


def class_folders(split_dir: Path) -> list[str]:
    """The sorted class sub-folder names of one split (hidden folders such as .ipynb_checkpoints are not classes)."""
    if not split_dir.is_dir():
        raise UsageError(f"image folder split missing: expected class sub-folders in {split_dir}")
    return sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def scan(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(image file, label) for every image of `classes` (label = index in `classes`); every class needs images."""
    samples = []
    for label, c in enumerate(classes):
        files = sorted(f for f in (split_dir / c).iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS)
        if not files:
            raise UsageError(f"no images ({', '.join(sorted(EXTENSIONS))}) in {split_dir / c}: every class needs some")
        samples += [(f, label) for f in files]
    return samples


def _names(names: list[str] | set[str], limit: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class ImageFiles(Dataset):
    """Decode with Pillow, resize the short side, then a random (train) or center crop to `size`.

    An item is (image, label, error): a file Pillow cannot decode gives a zero image and a one-line error naming
    it, which the main process raises (an exception raised in a loader worker would arrive as a traceback)."""

    def __init__(self, samples: list[tuple[Path, int]], size: int, train: bool, seed: int = 0):
        self.samples, self.size, self.train = samples, size, train
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.samples[i]
        try:
            x = self._decode(path, i)
        except Exception as e:  # images are untrusted files: any decoding failure is a bad file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            return torch.zeros(3, self.size, self.size), label, f"cannot decode image {path}: {reason}"
        if self.train and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        return x, label, ""

    def _decode(self, path: Path, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = (self.size * (1.14 if self.train else 1.0)) / min(im.size)
            im = im.resize((max(self.size, round(im.width * scale)), max(self.size, round(im.height * scale))))
            w, h = im.size
            if self.train:
                rng = np.random.default_rng((self.seed, i, torch.initial_seed() % (1 << 31)))
                left, top = int(rng.integers(0, w - self.size + 1)), int(rng.integers(0, h - self.size + 1))
            else:
                left, top = (w - self.size) // 2, (h - self.size) // 2
            im = im.crop((left, top, left + self.size, top + self.size))
            return torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0


class ImageFolderData:
    """ROOT/train/CLASS/* and ROOT/val/CLASS/*: both splits must hold the same class folders, each with images
    (a class missing from val/ would go untested; one only in val/ could never be predicted)."""

    def __init__(self, root: Path, image_size: int = 224, augment: bool = True, workers: int | None = None):
        self.name = f"imagefolder:{root}"
        try:
            self._scan(root)
        except OSError as e:  # an unreadable folder (permissions, a vanished mount)
            raise UsageError(f"cannot read image folder {e.filename or root}: {e.strerror or e}") from None
        self.image_size = image_size
        self.augment = augment
        self.workers = workers if workers is not None else min(4, os.cpu_count() or 1)

    def _scan(self, root: Path) -> None:
        if not root.is_dir():
            raise UsageError(f"image folder {root} {'is not a folder' if root.exists() else 'does not exist'}")
        classes = class_folders(root / "train")
        if len(classes) < 2:
            raise UsageError(f"{root / 'train'} needs at least two class sub-folders, found {len(classes)}")
        val = class_folders(root / "val")
        if not val:
            raise UsageError(f"no class sub-folders in {root / 'val'} (it needs the {len(classes)} of train/)")
        if set(classes) - set(val):
            raise UsageError(f"{root / 'val'} lacks class folders that train/ has: {_names(set(classes) - set(val))}")
        if set(val) - set(classes):
            raise UsageError(f"{root / 'val'} has class folders that train/ lacks (the model could never predict "
                             f"them): {_names(set(val) - set(classes))}")
        self.class_names = classes
        self.train_samples = scan(root / "train", classes)
        self.test_samples = scan(root / "val", classes)
        self.num_classes = len(classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    @property
    def num_train(self) -> int:
        return len(self.train_samples)

    def num_train_batches(self, batch_size: int) -> int:
        return -(-self.num_train // batch_size)

    def subset(self, n: int) -> ImageFolderData:
        copy = object.__new__(ImageFolderData)
        copy.__dict__.update(self.__dict__, train_samples=self.train_samples[:n])
        return copy

    def with_classes(self, classes: list[int]) -> ImageFolderData:
        """Only the images of `classes` (checked by `select_classes`), relabelled 0..k-1 in that order."""
        remap = {c: i for i, c in enumerate(classes)}
        copy = object.__new__(ImageFolderData)
        copy.__dict__.update(
            self.__dict__, num_classes=len(classes), class_names=[self.class_names[c] for c in classes],
            train_samples=[(f, remap[y]) for f, y in self.train_samples if y in remap],
            test_samples=[(f, remap[y]) for f, y in self.test_samples if y in remap],
        )
        return copy

    def _batches(self, files: ImageFiles, batch_size: int, generator: torch.Generator | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decoded batches; the first file that cannot be decoded stops the run with its name (exit 2)."""
        loader = DataLoader(files, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                            num_workers=self.workers, persistent_workers=False)
        for x, y, errors in loader:
            bad = [e for e in errors if e]
            if bad:
                more = f" ({len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
                raise UsageError(f"{bad[0]}{more}; delete or replace the file")
            yield x, y

    def train_batches(
        self, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = int(torch.randint(0, 1 << 31, (1,), generator=generator))
        files = ImageFiles(self.train_samples, self.image_size, train=self.augment, seed=seed)
        for x, y in self._batches(files, batch_size, generator):
            if world_size > 1:
                rows = shard(len(y), rank, world_size)
                x, y = x[rows.start : rows.stop], y[rows.start : rows.stop]
            yield x, y

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self._batches(ImageFiles(self.test_samples, self.image_size, train=False), batch_size, None)
