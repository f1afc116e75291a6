"""Data sets that are not MNIST, for the tests of the user's own data: the UCI handwritten digits (1,797
real 8 × 8 images, shipped inside scikit-learn's wheel: read as a file, offline) and a colour image folder
written by the test itself (MNIST digits drawn in colour on coloured backgrounds, 32 × 32 RGB)."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluid_mpi.model import data

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 UCI digits as uint8 (N, 8, 8) in 0..255 (the originals count 0..16) and their labels;
    skips the test when scikit-learn (a test dependency) is not installed."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-learn (a test dependency: pip install --no-deps scikit-learn) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    rows = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)
    images = np.clip(rows[:, :-1] * 16, 0, 255).astype(np.uint8).reshape(-1, 8, 8)
    return images, rows[:, -1]


def uci_digits_npz(path: Path, test_share: float = 0.25) -> Path:
    """A ``.npz`` of the UCI digits split per class (a fixed draw), with class names."""
    x, y = uci_digits()
    test = np.zeros(len(y), bool)
    rng = np.random.default_rng(0)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[:round(len(idx) * test_share)]] = True
    np.savez(path, x_train=x[~test], y_train=y[~test], x_test=x[test], y_test=y[test], classes=np.array(NAMES))
    return path


def colour_digit_folder(root: Path, per_class: int, side: int = 32, seed: int = 0) -> Path:
    """``root/<digit name>/NNN.png``: embedded MNIST digits (resized to ``side``) drawn in a random ink
    colour on a random background colour, far enough apart to read; PNG, RGB."""
    ds = data.load_split(None, "train")
    rng = np.random.default_rng(seed)
    for c, name in enumerate(NAMES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(ds.images[ds.labels == c][:per_class]):
            ink = np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BILINEAR), np.float32) / 255
            bg = rng.integers(0, 120, 3).astype(np.float32)
            fg = rng.integers(150, 256, 3).astype(np.float32)
            rgb = bg * (1 - ink[..., None]) + fg * ink[..., None]
            Image.fromarray(rgb.round().astype(np.uint8), "RGB").save(root / name / f"{i:03d}.png")
    return root
