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

from bpfree.core.errors import UsageError

IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1-d, images: 3-d
IDX_KIND = {1: "labels", 3: "images"}


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array; a one-line UsageError for bad or truncated files.

    `ndim` (1 for labels, 3 for images), if given, is the kind of file expected in this slot."""
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
    found = IDX_MAGIC[magic]
    if ndim is not None and found != ndim:
        raise UsageError(f"{path} holds {IDX_KIND[found]} ({found}-d IDX), but this file should hold "
                         f"{IDX_KIND.get(ndim, f'{ndim}-d data')}")
    header = 4 + 4 * found
    if len(raw) < header:
        raise UsageError(f"{path} is truncated (incomplete header)")
    shape = struct.unpack(f">{found}I", raw[4:header])
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise UsageError(f"{path} is truncated or corrupt: expected {size} data bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as pickle protocol 2 uses it for bytes (always latin-1), and nothing more."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


# What a CIFAR-10 batch pickle may name: numpy's array (and scalar, for labels written as numpy integers)
# reconstruction, under numpy 1's module name (numpy.core) or numpy 2's (numpy._core), and bytes as latin-1 text.
_RECONSTRUCT, _SCALAR = np.ndarray.__reduce__(np.zeros(0))[0], np.int64(0).__reduce__()[0]
CIFAR_PICKLE_GLOBALS = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _RECONSTRUCT for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _SCALAR for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,  # how protocol 2 writes bytes
}


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 batch holds: numpy arrays, dicts, lists, bytes, str and numbers.

    A pickle can call any importable function while it loads (`os.system`, say); this one refuses every global
    outside CIFAR_PICKLE_GLOBALS, so a crafted batch file is rejected before any of it runs."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in CIFAR_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only numpy "
                                         "arrays, lists and dicts (a crafted or foreign pickle?)")
        return CIFAR_PICKLE_GLOBALS[(module, name)]


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images [N, 3, 32, 32] uint8 and labels [N]. Loaded with CifarUnpickler: the
    file is untrusted input, and any failure (a refused global included) is one UsageError naming the file."""
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, encoding="bytes").load()
        if not isinstance(batch, dict) or not isinstance(batch.get(b"data"), np.ndarray):
            raise ValueError("expected a dict holding a numpy array under b'data'")
        if batch[b"data"].dtype != np.uint8:
            raise ValueError(f"image data of dtype {batch[b'data'].dtype}, expected uint8")
        data = batch[b"data"].reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as e:  # untrusted bytes can fail in any way; each is a bad file, not a bug here
        reason = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {reason})") from None
    if labels.ndim != 1 or len(data) != len(labels):
        raise UsageError(f"{path} is corrupt: {len(data)} images but labels of shape {tuple(labels.shape)}")
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
