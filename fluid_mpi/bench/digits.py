"""A second real data set for the bench and the tests: the UCI handwritten digits (1,797 real 8 × 8
images, 10 classes; Alpaydin and Kaynak, 1998) that scikit-learn ships inside its wheel. The CSV is read
as a file (``pip install --no-deps scikit-learn``: none of its scipy stack is needed).

    python -m fluid_mpi.bench.digits OUT.npz    # then: fluid-mpi bench --data OUT.npz
"""
from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

import numpy as np

from ..errors import DataError

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEST_SHARE = 0.25  # held out per class, a fixed draw


def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as uint8 (N, 8, 8) in 0..255 (the originals count 0..16) and their labels."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("scikit-learn is not installed (pip install --no-deps scikit-learn: its wheel holds the digits)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    rows = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)
    return np.clip(rows[:, :-1] * 16, 0, 255).astype(np.uint8).reshape(-1, 8, 8), rows[:, -1]


def write_npz(path: str | Path, test_share: float = TEST_SHARE) -> Path:
    """A ``.npz`` of the digits (x_train, y_train, x_test, y_test, classes), split per class."""
    x, y = uci_digits()
    test = np.zeros(len(y), bool)
    rng = np.random.default_rng(0)
    for c in range(len(NAMES)):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[:round(len(idx) * test_share)]] = True
    np.savez(path, x_train=x[~test], y_train=y[~test], x_test=x[test], y_test=y[test], classes=np.array(NAMES))
    return Path(path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fluid_mpi.bench.digits OUT.npz")
    print(write_npz(sys.argv[1]))
