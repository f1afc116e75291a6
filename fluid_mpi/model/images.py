"""The user's own inputs turned into a model's inputs, as its checkpoint's :class:`InputSpec` says: a
plain resize to the model's size and channels (``prepare="resize"``), or for digit models (MNIST's,
``prepare="digit"``) an MNIST-like uint8 28 × 28, white digit on black.

How one image becomes a digit input (:func:`image_to_input`), the way MNIST itself was made:

1. **Grayscale.** The first frame (GIF/TIFF) is converted to 8-bit gray (Pillow mode ``L``); transparent
   pixels are first laid on white (a digit drawn on a transparent canvas is dark ink on "paper"); 16-bit
   and float images are stretched min..max to 0..255.
2. **Auto-invert.** When the mean of the border pixels (the outermost row and column on every side) is
   above 127.5, the background is light and the image is inverted, so the digit is white on black.
3. **Background and contrast.** The border's median (the background level) is subtracted, negatives
   clipped to 0, and the result stretched so that the brightest ink pixel is 255 (MNIST digits all reach
   254-255). Pixels below :data:`INK_THRESHOLD` are then set to 0 (noise floor).
4. **Crop** to the bounding box of the remaining ink (pixels > 0). No ink at all gives a black input.
5. **Scale** so that the longer side of the box is 20 px, keeping the aspect ratio (Lanczos resampling,
   anti-aliased like MNIST's).
6. **Centre by centre of mass.** The box is pasted into a black 28×28 canvas so that its intensity centre
   of mass falls on pixel (14, 14) (rounded to whole pixels, as MNIST did; kept fully inside the canvas).

The data set's normalisation is applied later, by :func:`fluid_mpi.model.data.to_tensor_batch`, to
these uint8 arrays exactly as to MNIST's own.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .spec import MNIST, InputSpec

SIDE = 28  # MNIST's input side
BOX = 20  # MNIST fitted each digit's longer side into 20 px before centring it in 28 x 28
CENTRE = 14.0  # MNIST's centre of mass, in pixel indices (measured on the test set: 13.99, 14.00)
LIGHT_BORDER = 127.5  # border mean above mid-gray means a light background: invert
# Noise floor on the 0..255 stretched ink: above JPEG ringing and scanner grain (typically < 20) yet low
# enough that MNIST's own faint anti-aliased edges mostly survive (the round-trip test checks this).
INK_THRESHOLD = 24
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


def _gray(img: Image.Image) -> np.ndarray:
    """Step 1: the current frame (the first, as Pillow opens it) as float64 gray 0..255."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    return np.asarray(img.convert("L"), dtype=np.float64)


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])


def image_to_input(img: Image.Image) -> np.ndarray:
    """One decoded image -> a 28×28 uint8 MNIST-like input (white digit on black, longer side of the
    ink's box 20 px, centre of mass at (14, 14)); the module docstring gives every step."""
    a = _gray(img)
    if _border(a).mean() > LIGHT_BORDER:
        a = 255.0 - a
    a = np.clip(a - np.median(_border(a)), 0.0, None)
    out = np.zeros((SIDE, SIDE), dtype=np.uint8)
    if a.max() <= 0:
        return out  # no ink: a black input (the model still answers; the caller sees its low confidence)
    a *= 255.0 / a.max()
    a[a < INK_THRESHOLD] = 0.0
    rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    a = a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = a.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL sizes are (width, height)
    if size != (w, h):
        box = Image.fromarray(a.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)  # mode F
        a = np.clip(np.asarray(box, dtype=np.float64), 0.0, 255.0)
    box = np.rint(a).astype(np.uint8)
    h, w = box.shape
    mass = box.sum(dtype=np.float64)
    if mass == 0:
        return out
    ys, xs = np.indices(box.shape)
    cy, cx = (ys * box).sum() / mass, (xs * box).sum() / mass
    top = int(np.clip(round(CENTRE - cy), 0, SIDE - h))
    left = int(np.clip(round(CENTRE - cx), 0, SIDE - w))
    out[top:top + h, left:left + w] = box
    return out


def resized(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """One decoded image -> uint8 ``spec.image_shape``: grey or RGB (transparency laid on white), resized
    to the model's size (bilinear, anti-aliased)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = Image.fromarray(np.rint(_gray(img)).astype(np.uint8))
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def prepare(img: Image.Image, spec: InputSpec = MNIST) -> np.ndarray:
    """One decoded image as ``spec`` says: MNIST-like digit centring or a plain resize."""
    return image_to_input(img) if spec.prepare == "digit" else resized(img, spec)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode one image file; raises :class:`DataError` with a one-line reason (missing,
    not an image, corrupt, truncated or over Pillow's size limit)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()  # the first frame (GIF/TIFF), detached from the closed file
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (PNG/JPEG/BMP/GIF/TIFF)") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types on damaged files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{path}: cannot decode the image ({reason})") from None


def decode_file(path: str | os.PathLike, spec: InputSpec = MNIST) -> np.ndarray:
    """Read one image file and return it as the model's input (uint8 ``spec.image_shape``); a
    :class:`DataError` says why it cannot. Used for each path of the stdin stream."""
    return prepare(open_image(path), spec)


@dataclass
class Inputs:
    """Loaded inputs: ``names[i]`` labels ``images[i]``; files that could not be decoded are in
    ``errors`` as ``(name, message)`` and have no image."""

    names: list[str]
    images: np.ndarray  # (N, *spec.image_shape) uint8
    errors: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def _stack(arrays: list[np.ndarray], spec: InputSpec) -> np.ndarray:
    return np.stack(arrays) if arrays else np.zeros((0, *spec.image_shape), dtype=np.uint8)


def _load_folder(folder: Path, spec: InputSpec) -> Inputs:
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".") and not p.is_dir())
    if not files:
        raise DataError(f"{folder}: no image files (PNG/JPEG/BMP/GIF/TIFF) in this folder")
    names, images, errors = [], [], []
    for p in files:
        try:
            images.append(decode_file(p, spec))
            names.append(p.name)
        except DataError as exc:
            errors.append((p.name, str(exc).removeprefix(f"{p}: ")))
    return Inputs(names, _stack(images, spec), errors)


def _to_uint8(a: np.ndarray, path: Path) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise DataError(f"{path}: array of {a.dtype}, expected numbers")
    if a.size == 0:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DataError(f"{path}: array holds NaN or infinite values")
        if a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0  # floats in [0, 1] are intensities: scale to 0..255
        a = np.rint(a)
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > 255:
        raise DataError(f"{path}: values {lo}..{hi} are outside 0..255 (or 0..1 for floats)")
    return a.astype(np.uint8)


def _load_npy(path: Path, spec: InputSpec) -> Inputs:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({' '.join(str(exc).split())})") from None
    if a.shape[1:] != spec.image_shape:
        raise DataError(f"{path}: array of shape {a.shape}, expected N×{'×'.join(map(str, spec.image_shape))}")
    if a.shape[0] == 0:
        raise DataError(f"{path}: array of shape {a.shape} holds no images")
    return Inputs([str(i) for i in range(len(a))], np.ascontiguousarray(_to_uint8(a, path)), [])


def load_inputs(path: str | os.PathLike, spec: InputSpec = MNIST) -> Inputs:
    """Load the user's inputs from ``path``, prepared for a model of ``spec`` (MNIST's by default):

    - a folder: every PNG/JPEG/BMP/GIF/TIFF file in it (by extension, case-insensitive; not recursive;
      hidden files skipped), sorted by name; names are the file names; a file that cannot be decoded goes
      into ``errors`` and loading goes on; a folder with no image file raises :class:`DataError`;
    - a ``.npy`` array N × ``spec.image_shape`` (N×28×28 for MNIST) of any numeric dtype (uint8 kept,
      floats in [0, 1] scaled to 0..255, other values must lie in 0..255) used as is (already prepared);
      names are the indices "0".."N-1";
    - a single image file: one input (a :class:`DataError` if it cannot be decoded).

    A missing path, a ``.npy`` of the wrong shape and anything else raise :class:`DataError` (one line).
    """
    p = Path(path)
    if p.is_dir():
        return _load_folder(p, spec)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.suffix.lower() == ".npy":
        return _load_npy(p, spec)
    if p.suffix.lower() in EXTENSIONS:
        return Inputs([p.name], decode_file(p, spec)[None], [])
    raise DataError(f"{p}: not a folder of images, a .npy array or an image file")
