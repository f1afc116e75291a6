"""What a model takes and gives: the input's channels and size, the classes, the normalisation computed
from the training set, and how a user's picture is prepared. One :class:`InputSpec` travels with every
model, part and checkpoint (``meta["input"]``); checkpoints written before it existed are MNIST's.

The trunk's geometry for any input size lives here too (:func:`geometry`): the paper's two conv5x5 +
maxpool2 stages, padded by 2 when the input is smaller than MNIST's 28 pixels a side (8 × 8 digits would
otherwise vanish), or ``cnn3``'s three conv3x3 stages; then an average pooling down to at most 4 × 4 before
the fc layer. On 28 × 28 the paper's maps are 4 × 4 already: MNIST models are exactly the paper's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # MNIST's training-set pixel mean and standard deviation (of x / 255)
MIN_SIDE, MAX_SIDE = 8, 512  # 8 × 8 digits up to camera-sized pictures
MAX_CLASSES = 10_000
PREPARE = ("digit", "resize")  # MNIST-like digit centring | a plain resize to the model's input size
# The trunks (--arch): the paper's small CNN (two conv5x5 stages), and a deeper one for colour pictures
# (three conv3x3 stages, the third as wide as the second), the same for the three families
ARCHS = ("paper", "cnn3")
POOL_MAX = 4  # the fc layer reads at most 4 × 4 maps per channel (the paper's CNN on 28 × 28)


def _digits() -> tuple[str, ...]:
    return tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class InputSpec:
    """A model's input (channels × height × width, uint8 pixels), classes and normalisation."""

    channels: int = 1
    height: int = 28
    width: int = 28
    classes: tuple[str, ...] = field(default_factory=_digits)
    mean: tuple[float, ...] = (MNIST_MEAN,)  # per channel, of pixel / 255
    std: tuple[float, ...] = (MNIST_STD,)
    prepare: str = "digit"
    arch: str = "paper"  # the trunk the model was built with (it depends on the input: see geometry)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, not {self.channels}")
        if not (MIN_SIDE <= self.height <= MAX_SIDE and MIN_SIDE <= self.width <= MAX_SIDE):
            raise ValueError(f"image size {self.height}x{self.width} outside {MIN_SIDE}..{MAX_SIDE} a side")
        if not 2 <= len(self.classes) <= MAX_CLASSES:
            raise ValueError(f"{len(self.classes)} classes: 2..{MAX_CLASSES} are supported")
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise ValueError("mean and std need one value per channel (std > 0)")
        if self.prepare not in PREPARE:
            raise ValueError(f"prepare must be one of {PREPARE}, not {self.prepare!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, not {self.arch!r}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One image as the wire and the datasets hold it: (H, W) grey, (H, W, C) colour, uint8."""
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, self.channels)

    @property
    def pixels(self) -> int:
        return self.channels * self.height * self.width

    def as_dict(self) -> dict:
        return {"channels": self.channels, "height": self.height, "width": self.width,
                "classes": list(self.classes), "mean": list(self.mean), "std": list(self.std),
                "prepare": self.prepare, "arch": self.arch}

    @classmethod
    def from_dict(cls, d: dict | None) -> "InputSpec":
        """From ``meta["input"]``; None (a checkpoint from before input specs) is MNIST."""
        if not d:
            return MNIST
        return cls(int(d["channels"]), int(d["height"]), int(d["width"]), tuple(str(c) for c in d["classes"]),
                   tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]), d.get("prepare", "resize"),
                   d.get("arch", "paper"))

    def to_tensor(self, images: np.ndarray):
        """uint8 (N, H, W) or (N, H, W, C) -> normalised float32 torch tensor (N, C, H, W).

        In numpy, in place on one float32 copy: for one channel the same values as torch's
        ``x.float().div_(255).sub_(mean).div_(std)`` (checked for all 256 pixel values, in the tests), at
        5 µs instead of 12 for one image: at batch 1 the conversion is ~5 % of a forward."""
        import torch

        x = np.asarray(images).astype(np.float32)
        np.divide(x, np.float32(255.0), out=x)
        if self.channels == 1:
            np.subtract(x, np.float32(self.mean[0]), out=x)
            np.divide(x, np.float32(self.std[0]), out=x)
            return torch.from_numpy(x).unsqueeze(1)
        np.subtract(x, np.asarray(self.mean, np.float32), out=x)
        np.divide(x, np.asarray(self.std, np.float32), out=x)
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


MNIST = InputSpec()


def stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, H, W[, C]), as fractions of 255."""
    x = np.asarray(images, np.float64) / 255.0
    axes = tuple(range(x.ndim - 1)) if x.ndim == 4 else None
    mean, std = np.atleast_1d(x.mean(axis=axes)), np.atleast_1d(x.std(axis=axes))
    return tuple(round(float(v), 6) for v in mean), tuple(round(max(float(v), 1e-3), 6) for v in std)


@dataclass(frozen=True)
class Geometry:
    """The trunk's shapes for one input size and trunk: conv kernel and padding, each conv's output map and
    each stage's after its pooling (height, width), and what fc reads per channel."""

    kernel: int
    pad: int
    convs: tuple[tuple[int, int], ...]
    stages: tuple[tuple[int, int], ...]
    pooled: tuple[int, int]  # average-pooled from the last stage when larger

    @property
    def n_convs(self) -> int:
        return len(self.convs)

    @property
    def pooled_size(self) -> int:
        return self.pooled[0] * self.pooled[1]


def geometry(spec: InputSpec) -> Geometry:
    """Shapes of ``spec.arch``'s trunk on ``spec``'s input: ``paper``, conv5x5 + pool twice (padded by 2 below
    28 pixels a side); ``cnn3``, conv3x3 (padded by 1) + pool three times; then pooled to at most 4 x 4."""
    if spec.arch == "paper":
        kernel, n, pad = 5, 2, 0 if min(spec.height, spec.width) >= 28 else 2
    else:
        kernel, n, pad = 3, 3, 1
    size, convs, stages = (spec.height, spec.width), [], []
    for _ in range(n):
        conv = (size[0] + 2 * pad - kernel + 1, size[1] + 2 * pad - kernel + 1)
        size = (conv[0] // 2, conv[1] // 2)
        convs.append(conv)
        stages.append(size)
    if min(size) < 1:
        raise ValueError(f"input {spec.height}x{spec.width} too small for the {spec.arch} trunk")
    return Geometry(kernel, pad, tuple(convs), tuple(stages), (min(POOL_MAX, size[0]), min(POOL_MAX, size[1])))
