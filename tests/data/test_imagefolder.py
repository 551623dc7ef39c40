"""Image-folder data sets (`bpfree.data.imagefolder`)."""

import numpy as np
import pytest
import torch

from bpfree.core.errors import UsageError
from bpfree.data import load


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
