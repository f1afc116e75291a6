"""The user's images -> MNIST-like inputs (fluid_mpi.model.images): decoding, centring, scaling, errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fluid_mpi.errors import DataError
from fluid_mpi.model import data
from fluid_mpi.model.images import Inputs, decode_file, image_to_input, load_inputs


def _stroke(size=(60, 100), ink=(0, 0, 0), paper=(255, 255, 255), mode="RGB") -> Image.Image:
    """A digit-like stroke (a '7': a bar and a diagonal) in a w x h image, off-centre on purpose."""
    w, h = size
    img = Image.new(mode, size, paper)
    d = ImageDraw.Draw(img)
    d.line([(w * 0.15, h * 0.2), (w * 0.7, h * 0.2), (w * 0.35, h * 0.85)], fill=ink, width=max(2, w // 10))
    return img


def _com(a: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(a.shape)
    m = a.sum(dtype=np.float64)
    return float((ys * a).sum() / m), float((xs * a).sum() / m)


def _box(a: np.ndarray) -> tuple[int, int]:
    rows, cols = np.flatnonzero(a.any(1)), np.flatnonzero(a.any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def _check_mnist_like(a: np.ndarray) -> None:
    assert a.shape == (28, 28) and a.dtype == np.uint8
    cy, cx = _com(a)
    assert abs(cy - 14) <= 1.0 and abs(cx - 14) <= 1.0, (cy, cx)
    assert max(_box(a)) in (19, 20, 21), _box(a)  # longer side of the ink box ~ 20 px
    assert a.max() >= 250 and a[0].max() == 0 and a[-1].max() == 0  # white ink, black border


def test_black_on_white_rgb_png_is_inverted_cropped_scaled_and_centred():
    img = _stroke()  # 60 wide x 100 high, black ink on white
    a = image_to_input(img)
    _check_mnist_like(a)
    h, w = _box(a)
    assert h >= w  # the taller-than-wide shape is kept (aspect ratio)
    assert abs(max(h, w) - 20) <= 1


def test_white_on_black_and_transparent_and_16bit_inputs():
    _check_mnist_like(image_to_input(_stroke(ink=(255, 255, 255), paper=(0, 0, 0))))
    rgba = _stroke(ink=(0, 0, 0, 255), paper=(0, 0, 0, 0), mode="RGBA")  # ink on a transparent canvas
    _check_mnist_like(image_to_input(rgba))
    g16 = Image.fromarray(np.asarray(_stroke().convert("L"), dtype=np.uint16) * 200)  # 16-bit gray
    _check_mnist_like(image_to_input(g16))
    assert not image_to_input(Image.new("L", (30, 30), 255)).any()  # no ink: a black input


def test_folder_of_mixed_files_sorted_with_corrupt_one_as_error(tmp_path):
    _stroke().save(tmp_path / "a_black_on_white.png")
    _stroke(ink=(255, 255, 255), paper=(0, 0, 0)).save(tmp_path / "b_white_on_black.jpg", quality=85)
    _stroke(size=(300, 200)).save(tmp_path / "c_wide.BMP")
    (tmp_path / "d_corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    inputs = load_inputs(tmp_path)
    assert isinstance(inputs, Inputs)
    assert inputs.names == ["a_black_on_white.png", "b_white_on_black.jpg", "c_wide.BMP"]
    assert inputs.images.shape == (3, 28, 28) and inputs.images.dtype == np.uint8
    for a in inputs.images:
        _check_mnist_like(a)
    assert len(inputs.errors) == 1 and inputs.errors[0][0] == "d_corrupt.png"
    assert "\n" not in inputs.errors[0][1] and inputs.errors[0][1]


def test_empty_folder_missing_path_and_decode_errors(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        load_inputs(tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_inputs(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no such file"):
        decode_file(tmp_path / "gone.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then garbage
    with pytest.raises(DataError) as err:
        decode_file(tmp_path / "bad.png")
    assert "\n" not in str(err.value) and "bad.png" in str(err.value)
    full = tmp_path / "full.jpg"
    _stroke().save(full)
    (tmp_path / "cut.jpg").write_bytes(full.read_bytes()[:300])  # a truncated JPEG: opens, fails to load
    with pytest.raises(DataError, match="cannot decode"):
        decode_file(tmp_path / "cut.jpg")
    good = tmp_path / "one.gif"
    _stroke().convert("P").save(good)
    _check_mnist_like(decode_file(good))


def test_npy_good_dtypes_and_wrong_shape(tmp_path):
    imgs = data.load_split(None, "test").images[:5]
    np.save(tmp_path / "u8.npy", imgs)
    got = load_inputs(tmp_path / "u8.npy")
    assert got.names == ["0", "1", "2", "3", "4"] and np.array_equal(got.images, imgs) and not got.errors
    np.save(tmp_path / "f.npy", imgs.astype(np.float32) / 255.0)
    assert np.array_equal(load_inputs(tmp_path / "f.npy").images, imgs)
    np.save(tmp_path / "i64.npy", imgs.astype(np.int64))
    assert np.array_equal(load_inputs(tmp_path / "i64.npy").images, imgs)
    np.save(tmp_path / "flat.npy", imgs.reshape(5, 784))
    with pytest.raises(DataError, match=r"\(5, 784\)"):
        load_inputs(tmp_path / "flat.npy")
    np.save(tmp_path / "big.npy", imgs.astype(np.int64) * 4)
    with pytest.raises(DataError, match="outside"):
        load_inputs(tmp_path / "big.npy")


def test_mnist_round_trip_through_png_keeps_pixels_and_predictions(tmp_path):
    """50 test images saved as PNG and loaded back are nearly identical, and a nearest-centroid classifier
    (fitted on the embedded train split: fast and deterministic) gives the same class for >= 90 %."""
    test = data.load_split(None, "test").images[:50]
    for i, a in enumerate(test):
        Image.fromarray(a).save(tmp_path / f"{i:03d}.png")
    back = load_inputs(tmp_path)
    assert back.names == [f"{i:03d}.png" for i in range(50)] and not back.errors
    diff = np.abs(back.images.astype(np.int16) - test.astype(np.int16))
    assert diff.mean() < 3.0, diff.mean()  # measured 0.54 on 300 images (faint edge pixels, 1-px shifts)
    assert (diff.reshape(50, -1).mean(1) < 1.0).mean() >= 0.9
    train = data.load_split(None, "train")
    x = train.images.reshape(len(train), -1).astype(np.float32)
    centroids = np.stack([x[train.labels == k].mean(0) for k in range(10)])

    def predict(imgs):
        f = imgs.reshape(len(imgs), -1).astype(np.float32)
        return ((f[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)

    assert (predict(back.images) == predict(test)).mean() >= 0.9
