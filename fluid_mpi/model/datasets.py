"""The user's own labelled data sets (``--data PATH``): a folder per class, a ``.npz``, or IDX files of any
image size (MNIST's format; its canonical files are read by ``data.py``, which dispatches here).

- **Folder per class** (``PATH/<class>/*.png|jpg|...``, as torchvision's ImageFolder): ``PATH/train/`` and
  ``PATH/test/`` when both exist, else one folder split per class into a held-out test fraction with a
  fixed seed (:data:`TEST_FRACTION` unless told). Class names are the folder names, sorted. Images of
  mixed sizes are resized to the size given or to the most common one; colour when any image has colour.
  Unreadable files are skipped and listed in ``Dataset.skipped``; an empty folder, a single class or a
  class with no readable image is a :class:`DataError`.
- **.npz** with ``x_train, y_train, x_test, y_test`` (uint8 N×H×W or N×H×W×C; integer labels) and an
  optional ``classes`` array of names.
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import EXTENSIONS, open_image, resized
from .spec import MAX_CLASSES, InputSpec

TEST_FRACTION = 0.2  # held out per class when a folder has no train/ and test/ split
SPLIT_SEED = 0  # the held-out images are the same on every run and every machine
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _classes_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                  and not p.name.startswith("."))


def _decode(files: list[Path], skipped: list[str]) -> list:
    out = []
    for f in files:
        try:
            out.append(open_image(f))
        except DataError as exc:
            skipped.append(str(exc))
    return out


def _stratified(n: int, label: int, fraction: float) -> np.ndarray:
    """Which of a class's ``n`` images (in file-name order) are held out for testing: a fixed draw."""
    rng = np.random.default_rng([SPLIT_SEED, label])
    k = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    test = np.zeros(n, bool)
    test[rng.permutation(n)[:k]] = True
    return test


def load_folder(path: Path, split: str, shape: tuple[int | None, int, int] | None = None,
                test_fraction: float = TEST_FRACTION):
    """One split of a folder-per-class data set as a :class:`~fluid_mpi.model.data.Dataset`. ``shape``
    (channels or None, height, width) forces the images' shape (the size the user gave, or a trained
    model's); by default the most common size, and colour when any picture has colour."""
    from .data import Dataset

    split_dirs = (path / "train").is_dir() and (path / "test").is_dir()
    root = path / "train" if split_dirs else path
    class_dirs = _classes_in(root)
    names = [d.name for d in class_dirs]
    if len(names) < 2:
        raise DataError(f"{root}: {len(names)} class folder(s); a data set needs at least 2 (one folder per class)")
    if len(names) > MAX_CLASSES:
        raise DataError(f"{root}: {len(names)} classes, at most {MAX_CLASSES} are supported")
    skipped: list[str] = []
    per_class = []
    for label, name in enumerate(names):
        folder = (path / split / name) if split_dirs else root / name
        files = _files(folder) if folder.is_dir() else []
        if split_dirs and split == "test" and not files:
            continue  # a class absent from the test folder: nothing to test there
        pictures = _decode(files, skipped)
        if not pictures:
            raise DataError(f"{folder}: class {name!r} has no readable image (PNG/JPEG/BMP/GIF/TIFF)")
        if not split_dirs:
            held = _stratified(len(pictures), label, test_fraction)
            pictures = [p for p, t in zip(pictures, held) if t == (split == "test")]
        per_class.append((label, pictures))
    every = [p for _, ps in per_class for p in ps]
    if not every:
        raise DataError(f"{path}: no image in the {split} split")
    channels, h, w = shape or (None, *collections.Counter((p.height, p.width) for p in every).most_common(1)[0][0])
    if channels is None:
        channels = 3 if any(p.mode not in GREY_MODES and _has_colour(p) for p in every) else 1
    colour = channels == 3
    try:
        spec = InputSpec(channels, h, w, tuple(names), (0.5,) * channels, (0.5,) * channels, "resize")
    except ValueError as exc:
        raise DataError(f"{path}: {exc} (--image-size H,W resizes them)") from None
    images = np.stack([resized(p, spec) for _, ps in per_class for p in ps])
    labels = np.array([label for label, ps in per_class for _ in ps], np.int64)
    how = (f"resized to {h}x{w}" if shape else f"{h}x{w}, the most common size") \
        if any((p.height, p.width) != (h, w) for p in every) else f"{h}x{w}"
    how += f", {'colour' if colour else 'grey'}"
    source = f"{path} {split} split ({len(labels)} images, {len(names)} classes, {how}" + \
        (f"; {len(skipped)} unreadable file(s) skipped)" if skipped else ")")
    return Dataset(images, labels, source, tuple(names), "resize", skipped)


def _has_colour(img) -> bool:
    """True when the picture's channels differ somewhere (an RGB file of grey pixels is grey)."""
    a = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool((a[..., 0] != a[..., 1]).any() or (a[..., 1] != a[..., 2]).any())


def load_npz(path: Path, split: str):
    """One split of a ``.npz`` data set."""
    from .data import Dataset

    try:
        z = np.load(path, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz ({' '.join(str(exc).split())[:100]})") from None
    x_key, y_key = f"x_{split}", f"y_{split}"
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")
    x, y = arrays[x_key], arrays[y_key]
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] == 3)):
        raise DataError(f"{path}: {x_key} has shape {x.shape}, expected N×H×W or N×H×W×3")
    if x.dtype != np.uint8 and not (np.issubdtype(x.dtype, np.integer) and x.size and 0 <= x.min() and x.max() <= 255):
        raise DataError(f"{path}: {x_key} is {x.dtype}; images must be uint8 (0..255)")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {y_key} must be a 1-D array of integer labels, not {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: {x_key} has {len(x)} images but {y_key} has {len(y)} labels")
    if not len(y):
        raise DataError(f"{path}: {x_key} holds no images")
    every = np.concatenate([arrays["y_train"], arrays["y_test"]]).astype(np.int64)
    classes = tuple(str(c) for c in arrays["classes"]) if "classes" in arrays else \
        tuple(str(i) for i in range(int(every.max()) + 1 if every.size else 0))
    if every.min() < 0 or every.max() >= len(classes):
        bad = int(every.min() if every.min() < 0 else every.max())
        raise DataError(f"{path}: label {bad} out of range 0..{len(classes) - 1}")
    if len(classes) < 2:
        raise DataError(f"{path}: a single class; a data set needs at least 2")
    shape = "x".join(map(str, x.shape[1:]))
    return Dataset(np.ascontiguousarray(x, np.uint8), y.astype(np.int64),
                   f"{path} {split} split ({len(y)} images {shape}, {len(classes)} classes)", classes, "resize")
