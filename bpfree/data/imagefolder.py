"""Image-folder data sets (ImageNet's layout: ROOT/train/CLASS/*.jpg, ROOT/val/CLASS/*.jpg), streamed from disk
by a DataLoader with worker processes: too large for memory is the normal case."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bpfree.errors import UsageError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics


def scan(split_dir: Path, classes: list[str] | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    if not split_dir.is_dir():
        raise UsageError(f"image folder split missing: expected class sub-folders in {split_dir}")
    classes = classes or sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise UsageError(f"no class sub-folders in {split_dir}")
    samples = [
        (f, label)
        for label, c in enumerate(classes)
        for f in sorted((split_dir / c).iterdir()) if (split_dir / c).is_dir() and f.suffix.lower() in EXTENSIONS
    ]
    if not samples:
        raise UsageError(f"no images ({', '.join(sorted(EXTENSIONS))}) under {split_dir}")
    return samples, classes


class ImageFiles(Dataset):
    """Decode with Pillow, resize the short side, then a random (train) or center crop to `size`."""

    def __init__(self, samples: list[tuple[Path, int]], size: int, train: bool, seed: int = 0):
        self.samples, self.size, self.train = samples, size, train
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[i]
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
            x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        if self.train and torch.rand(1).item() < 0.5:
            x = x.flip(-1)
        x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
        return x, label


class ImageFolderData:
    def __init__(self, root: Path, image_size: int = 224, augment: bool = True, workers: int | None = None):
        self.name = f"imagefolder:{root}"
        self.train_samples, classes = scan(root / "train")
        self.test_samples, _ = scan(root / "val", classes)
        self.num_classes = len(classes)
        self.image_size = image_size
        self.augment = augment
        self.workers = workers if workers is not None else min(4, os.cpu_count() or 1)

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

    def _loader(self, dataset: Dataset, batch_size: int, generator: torch.Generator | None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                          num_workers=self.workers, persistent_workers=False)

    def train_batches(
        self, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seed = int(torch.randint(0, 1 << 31, (1,), generator=generator))
        files = ImageFiles(self.train_samples, self.image_size, train=self.augment, seed=seed)
        for x, y in self._loader(files, batch_size, generator):
            if world_size > 1:
                x, y = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
            yield x, y

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from self._loader(ImageFiles(self.test_samples, self.image_size, train=False), batch_size, None)
