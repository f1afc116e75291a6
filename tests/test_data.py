"""MNIST readers: IDX gz/raw, both layouts, corrupt/truncated/wrong-MD5 files, the embedded default."""
import gzip
import struct

import numpy as np
import pytest

from fluid_mpi.model import data
from fluid_mpi.errors import DataError


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + \
        arr.astype(np.uint8).tobytes()


def write_split(folder, split="test", n=12, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    imgs, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    folder.mkdir(parents=True, exist_ok=True)
    for base, arr in zip(data.SPLITS[split], (imgs, labels)):
        blob = idx_bytes(arr)
        if gz:
            (folder / (base + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (folder / base).write_bytes(blob)
    return imgs, labels


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", [".", "MNIST/raw"])
def test_reads_gz_and_raw_in_both_layouts(tmp_path, gz, layout):
    imgs, labels = write_split(tmp_path / layout, gz=gz)
    ds = data.load_split(tmp_path, "test")
    assert np.array_equal(ds.images, imgs) and np.array_equal(ds.labels, labels)
    assert ds.images.flags.writeable


def test_missing_dir_and_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_split(tmp_path / "nope", "test")
    with pytest.raises(DataError, match="missing MNIST file t10k-images"):
        data.load_split(tmp_path, "test")


def test_corrupt_gzip_names_the_file(tmp_path):
    write_split(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob[:-10]))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: corrupt or truncated"):
        data.load_split(tmp_path, "test")


def test_truncated_raw_file(tmp_path):
    write_split(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        data.load_split(tmp_path, "test")


def test_not_idx_and_count_mismatch(tmp_path):
    write_split(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"hello world, not idx")
    with pytest.raises(DataError, match="not an IDX1"):
        data.load_split(tmp_path, "test")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5)))
    with pytest.raises(DataError, match="12 images but"):
        data.load_split(tmp_path, "test")


def test_wrong_md5_on_canonical_sized_file(tmp_path):
    """A file with a canonical name and size must match the canonical MD5 (10,000 random labels have
    the canonical size of t10k-labels-idx1-ubyte, but not its checksum)."""
    write_split(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(10000)))
    assert (tmp_path / "t10k-labels-idx1-ubyte").stat().st_size == data.CANONICAL["t10k-labels-idx1-ubyte"][0]
    with pytest.raises(DataError, match="MD5 .* differs from the canonical"):
        data.load_split(tmp_path, "test")


def test_embedded_default_is_balanced_disjoint_and_deterministic():
    train, test = data.load_split(None, "train"), data.load_split(None, "test")
    assert len(train) == 4000 and len(test) == 1000
    assert np.bincount(train.labels).tolist() == [400] * 10
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert len(set(train.labels[:100].tolist())) == 10  # shuffled: any prefix (--limit) has every digit
    assert "embedded" in train.source
    again = data.load_split(None, "test")
    assert np.array_equal(again.images, test.images)
    train_set = {img.tobytes() for img in train.images}
    assert sum(img.tobytes() in train_set for img in test.images) == 0


def test_full_mnist_verifies(shared_mnist):
    test = data.load_split(shared_mnist, "test")
    assert len(test) == 10000 and test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).sum() == 10000


def test_to_tensor_batch_matches_the_torch_normalisation_for_every_pixel_value():
    """The runtime converts in numpy (faster); every uint8 value must give torch's float32 bits exactly."""
    import torch

    from fluid_mpi.model.data import to_tensor_batch

    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    expected = torch.from_numpy(pixels).float().div_(255.0).sub_(0.1307).div_(0.3081).unsqueeze(1)
    got = to_tensor_batch(pixels)
    assert got.dtype == torch.float32 and got.shape == (1, 1, 16, 16)
    assert torch.equal(got, expected)
