"""Cameras to rays in model space, and a scene box for captures whose world frame is not the official one.

The pipeline stores metric OpenCV cameras (``world_2_cam``, ``K``; pixel centres at +0.5). The model works
in model units (metres x ``world_scale``), so rays are scaled here, in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Rays:
    origins: torch.Tensor  # [N, 3] model units
    directions: torch.Tensor  # [N, 3] unit length, world frame
    z_dirs: torch.Tensor  # [N] camera-space z of the unit direction: z-depth = distance * z_dir


def _as_tensor(a: np.ndarray | torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not torch.is_tensor(a) else a, dtype=torch.float64).to(device)


def pixel_centers(width: int, height: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[H * W, 2]`` (u, v) pixel-centre coordinates, row-major."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float64) + 0.5,
                          torch.arange(width, device=device, dtype=torch.float64) + 0.5, indexing="ij")
    return torch.stack([u, v], dim=-1).view(-1, 2)


def camera_rays(K: np.ndarray | torch.Tensor, world_2_cam: np.ndarray | torch.Tensor, uv: torch.Tensor,
                world_scale: float = 1.0, dtype: torch.dtype = torch.float32) -> Rays:
    """Rays through pixel coordinates ``uv[N, 2]`` of a metric OpenCV camera, in model units.

    Computed in float64 and cast to ``dtype``; directions are normalised, so ray distances are in model units
    and ``z_dirs`` converts them to z-depth.
    """
    device = uv.device
    K, w2c = _as_tensor(K, device), _as_tensor(world_2_cam, device)
    uv = uv.to(torch.float64)
    cam = torch.stack([(uv[:, 0] - K[0, 2] - K[0, 1] * (uv[:, 1] - K[1, 2]) / K[1, 1]) / K[0, 0],
                       (uv[:, 1] - K[1, 2]) / K[1, 1], torch.ones_like(uv[:, 0])], dim=-1)
    cam = cam / torch.linalg.norm(cam, dim=-1, keepdim=True)
    rotation = w2c[:3, :3]
    directions = cam @ rotation  # R^T applied to row vectors
    origin = -(rotation.T @ w2c[:3, 3]) * world_scale
    return Rays(origin.expand_as(directions).to(dtype), directions.to(dtype), cam[:, 2].to(dtype))


def scale_world_2_cam(world_2_cam: np.ndarray | torch.Tensor, world_scale: float) -> torch.Tensor:
    """The same camera in model units: x_model = s x_world, so the translation scales by s."""
    w2c = _as_tensor(world_2_cam, None).clone()
    w2c[:3, 3] *= world_scale
    return w2c


def scene_box_from_cameras(world_2_cams: Sequence[np.ndarray | torch.Tensor], box_size_m: Sequence[float],
                           world_scale: float = 9.0, center: Sequence[float] | None = None) -> torch.Tensor:
    """An axis-aligned box ``[2, 3]`` (model units) of ``box_size_m`` metres around the rig's focus point.

    Not part of the official method, whose boxes are hand-set per subject in its own aligned world frame.
    For a rig that looks at the head, the point nearest to all optical axes (least squares) is the head's
    centre; ``center`` (metres) overrides it.
    """
    if center is None:
        a = torch.zeros(3, 3, dtype=torch.float64)
        b = torch.zeros(3, dtype=torch.float64)
        for w2c in world_2_cams:
            w2c = _as_tensor(w2c, None)
            axis = w2c[2, :3]  # camera z axis in world coordinates (third row of R)
            origin = -(w2c[:3, :3].T @ w2c[:3, 3])
            projector = torch.eye(3, dtype=torch.float64) - torch.outer(axis, axis)
            a += projector
            b += projector @ origin
        center_t = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    else:
        center_t = torch.as_tensor(center, dtype=torch.float64)
    half = torch.as_tensor(box_size_m, dtype=torch.float64) / 2
    return (torch.stack([center_t - half, center_t + half]) * world_scale).float()
