"""Batched affine augmentation (torchvision's RandomAffine, for a whole batch at once): one
affine grid per batch on the device, instead of one PIL transform per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mnistkit.recipe import Augment

__all__ = ["affine_theta", "sample_affine", "augment_batch"]


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


def sample_affine(n: int, aug: Augment, size: int, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """Per-sample random parameters drawn like ``RandomAffine.get_params`` (translations
    rounded to whole pixels), returned as affine_grid matrices ``[n, 2, 3]``."""
    u = torch.rand(4, n, generator=generator, device=device)
    angle = (u[0] * 2 - 1) * aug.degrees
    max_d = aug.translate * size
    tx = torch.round((u[1] * 2 - 1) * max_d)
    ty = torch.round((u[2] * 2 - 1) * max_d)
    scale = aug.scale_min + u[3] * (aug.scale_max - aug.scale_min)
    return affine_theta(angle, tx, ty, scale, None, size, size)


def augment_batch(x: torch.Tensor, theta: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Warp a batch ``[B, C, H, W]`` with per-sample matrices; pixels from outside are 0."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
