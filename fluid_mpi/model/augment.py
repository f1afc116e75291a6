"""Training-time augmentation: a small random affine warp per image (rotation up to ±10°, scale ±10 %,
shift up to ±2 pixels of 28, in proportion on other sizes), as handwriting varies. Deterministic for a generator; run only in training, so
inference is unchanged. Tiny per-device models gain most from it (1-2 pp on MNIST at Pi-class widths)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .spec import MNIST_MEAN, MNIST_STD, InputSpec

BACKGROUND = (0.0 - MNIST_MEAN) / MNIST_STD  # a blank pixel after normalisation: what is shifted in
MAX_ROTATION, MAX_SCALE, MAX_SHIFT_PX = math.radians(10), 0.10, 2.0  # the shift on a 28-pixel side
MNIST_SIDE = 28


def background(spec: InputSpec) -> float | torch.Tensor:
    """What a warp shifts in: a black pixel after ``spec``'s normalisation (MNIST's blank paper; black, as
    torchvision's RandomAffine fills, for other pictures), one value per channel."""
    if spec.channels == 1:
        return (0.0 - spec.mean[0]) / spec.std[0]
    return torch.tensor([(0.0 - m) / s for m, s in zip(spec.mean, spec.std)]).view(1, -1, 1, 1)


def affine(x: torch.Tensor, gen: torch.Generator, fill: float | torch.Tensor = BACKGROUND) -> torch.Tensor:
    """A randomly warped copy of the normalised batch ``x`` (B, C, H, W), ``fill`` shifted in."""
    b, _, h, w = x.shape
    u = torch.rand(b, 4, generator=gen) * 2 - 1  # uniform in [-1, 1]
    angle, scale = u[:, 2] * MAX_ROTATION, 1 + u[:, 3] * MAX_SCALE
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    # the shift scales with the image: 2 px on MNIST's 28, half a pixel on 8 x 8 digits
    sx, sy = MAX_SHIFT_PX * w / MNIST_SIDE, MAX_SHIFT_PX * h / MNIST_SIDE
    theta[:, 0, 2], theta[:, 1, 2] = -u[:, 0] * sx * 2 / w, -u[:, 1] * sy * 2 / h
    grid = F.affine_grid(theta, (b, 1, h, w), align_corners=False)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
