"""Parsers of the standard on-disk formats (IDX .gz for the MNIST family, CIFAR-10 python pickles),
and fetching missing files from the data sets' usual public mirrors with checksum verification."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from bpfree.errors import UsageError

IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1-d, images: 3-d


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array; a one-line UsageError for bad or truncated files."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if len(raw) < 8:
        raise UsageError(f"{path} is truncated ({len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic not in IDX_MAGIC:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes (magic number {magic:#x})")
    ndim = IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"{path} is truncated (incomplete header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise UsageError(f"{path} is truncated or corrupt: expected {size} data bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images [N, 3, 32, 32] uint8 and labels [N]."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
        raise UsageError(f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if len(data) != len(labels):
        raise UsageError(f"{path} is corrupt: {len(data)} images but {len(labels)} labels")
    return data, labels


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, dest: Path, checksum: str, timeout: float = 10.0) -> bool:
    """Download `url` to `dest` if the network allows and the md5 matches; False (and nothing left) otherwise.

    BPFREE_OFFLINE=1 skips the attempt (tests, air-gapped machines)."""
    if os.environ.get("BPFREE_OFFLINE"):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        if md5(tmp) != checksum:
            tmp.unlink()
            return False
        tmp.replace(dest)
        return True
    except Exception:  # no network, DNS failure, HTTP error: the caller reports the missing files
        tmp.unlink(missing_ok=True)
        return False


def extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
