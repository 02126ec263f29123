"""Batched affine augmentation (torchvision's RandomAffine, for a whole batch at once): one
affine grid per batch on the device, instead of one PIL transform per image.

``recording()`` lets a caller see the parameters each batch drew (``mnistkit augment`` shows
them): the trainer's own draws, kept while the context is open; outside it nothing is kept."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from mnistkit.recipe import Augment

__all__ = ["AffineDraw", "affine_theta", "draw_affine", "sample_affine", "augment_batch", "recording"]


@dataclass(frozen=True)
class AffineDraw:
    """The parameters one batch drew, one value per image: rotation in degrees (as
    ``torchvision.transforms.functional.affine`` takes it: positive turns the digit clockwise on
    screen), translation in whole pixels (x right, y down), scale; no shear (the recipe has none)."""

    angle: torch.Tensor
    tx: torch.Tensor
    ty: torch.Tensor
    scale: torch.Tensor

    def per_image(self) -> list[dict[str, float]]:
        rows = zip(*(t.detach().cpu().tolist() for t in (self.angle, self.tx, self.ty, self.scale)))
        return [{"angle": round(a, 4), "translate_x": int(x), "translate_y": int(y), "scale": round(s, 5),
                 "shear": 0.0} for a, x, y, s in rows]


_local = threading.local()   # recorders of this thread: a training in another thread is not seen


@contextlib.contextmanager
def recording() -> Iterator[list[AffineDraw]]:
    """Within the block, every batch's draw (``sample_affine``) in this thread is appended to the
    list yielded."""
    drawn: list[AffineDraw] = []
    recorders = _local.__dict__.setdefault("recorders", [])
    recorders.append(drawn)
    try:
        yield drawn
    finally:
        recorders.remove(drawn)


def affine_theta(angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, scale: torch.Tensor,
                 shear: torch.Tensor | None, height: int, width: int) -> torch.Tensor:
    """``[B, 2, 3]`` matrices for ``F.affine_grid(..., align_corners=False)`` that reproduce
    ``torchvision.transforms.functional.affine`` on tensors (centre of the image, angle in
    degrees clockwise-positive as torchvision has it, translation in pixels, shear along x)."""
    rot = torch.deg2rad(angle)
    sx = torch.deg2rad(shear) if shear is not None else torch.zeros_like(rot)
    # torchvision's _get_inverse_affine_matrix with sy = 0 and centre (0, 0)
    a, c = torch.cos(rot), torch.sin(rot)
    b = -torch.cos(rot) * torch.tan(sx) - torch.sin(rot)
    d = -torch.sin(rot) * torch.tan(sx) + torch.cos(rot)
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    m2 = -(m0 * tx + m1 * ty)
    m5 = -(m3 * tx + m4 * ty)
    # pixel coordinates (centred) -> normalised coordinates of affine_grid
    theta = torch.stack([
        torch.stack([m0, m1 * height / width, m2 * 2 / width], -1),
        torch.stack([m3 * width / height, m4, m5 * 2 / height], -1),
    ], 1)
    return theta


def draw_affine(n: int, aug: Augment, size: int, generator: torch.Generator,
                device: torch.device) -> AffineDraw:
    """Per-sample random parameters drawn like ``RandomAffine.get_params`` (translations
    rounded to whole pixels): one ``torch.rand`` of ``[4, n]`` from ``generator``."""
    u = torch.rand(4, n, generator=generator, device=device)
    angle = (u[0] * 2 - 1) * aug.degrees
    max_d = aug.translate * size
    tx = torch.round((u[1] * 2 - 1) * max_d)
    ty = torch.round((u[2] * 2 - 1) * max_d)
    scale = aug.scale_min + u[3] * (aug.scale_max - aug.scale_min)
    return AffineDraw(angle, tx, ty, scale)


def sample_affine(n: int, aug: Augment, size: int, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """``draw_affine``'s parameters as affine_grid matrices ``[n, 2, 3]``."""
    d = draw_affine(n, aug, size, generator, device)
    for drawn in getattr(_local, "recorders", ()):
        drawn.append(d)
    return affine_theta(d.angle, d.tx, d.ty, d.scale, None, size, size)


def augment_batch(x: torch.Tensor, theta: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Warp a batch ``[B, C, H, W]`` with per-sample matrices; pixels from outside are 0."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
