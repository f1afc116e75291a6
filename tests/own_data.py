"""Data sets that are not MNIST, for the tests of the user's own data: the UCI handwritten digits (1,797
real 8 × 8 images, shipped inside scikit-learn's wheel: read as a file, offline) and a colour image folder
written by the test itself (MNIST digits drawn in colour on coloured backgrounds, 32 × 32 RGB)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluid_mpi.bench import digits
from fluid_mpi.bench.digits import NAMES
from fluid_mpi.model import data


def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI digits (uint8 8 x 8, labels); skips the test when scikit-learn (a test dependency) is absent."""
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn (a test dependency: pip install --no-deps scikit-learn) is not installed")
    return digits.uci_digits()


def uci_digits_npz(path: Path) -> Path:
    """A ``.npz`` of the UCI digits split per class (a fixed draw), with class names."""
    uci_digits()
    return digits.write_npz(path)


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
