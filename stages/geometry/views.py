"""Camera geometry for the depth stage, as torch tensors on the working device.

Same conventions as :mod:`stages.core.cameras` (world_2_cam with OpenCV axes, pixel centres at +0.5); these
are the batched torch forms that the sweep, the visual hull and the consistency filter share, so none of
them re-derives a projection of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from stages.core.cameras import camera_center, intrinsics_for_size, invert_pose


@dataclass(frozen=True)
class Views:
    """Every camera of a store: K for the stored size and world_2_cam, numpy (float64) and torch (float32)."""

    serials: list[str]
    K: np.ndarray  # (C, 3, 3)
    world_2_cam: np.ndarray  # (C, 4, 4)
    width: int
    height: int
    device: torch.device

    @property
    def count(self) -> int:
        return len(self.serials)

    @property
    def centres(self) -> np.ndarray:
        """(C, 3) camera centres in world coordinates."""
        return camera_center(self.world_2_cam)

    @property
    def axes(self) -> np.ndarray:
        """(C, 3) unit optical axes (camera +z) in world coordinates: the third row of each rotation."""
        return self.world_2_cam[:, 2, :3] / np.linalg.norm(self.world_2_cam[:, 2, :3], axis=1, keepdims=True)

    def resized(self, width: int, height: int) -> Views:
        """The same cameras for frames resized to ``width`` x ``height`` (K scaled, poses unchanged)."""
        K = np.stack([intrinsics_for_size(k, (self.width, self.height), (width, height)) for k in self.K])
        return replace(self, K=K, width=width, height=height)

    def K_t(self, index: int | slice | None = None) -> torch.Tensor:
        return _tensor(self.K if index is None else self.K[index], self.device)

    def world_2_cam_t(self, index: int | slice | None = None) -> torch.Tensor:
        return _tensor(self.world_2_cam if index is None else self.world_2_cam[index], self.device)


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float32), device=device)


def make_views(serials: list[str], intrinsics: dict[str, np.ndarray], world_2_cam: dict[str, np.ndarray],
               width: int, height: int, device: torch.device) -> Views:
    """Stack the store's per-serial matrices in the store's camera order."""
    return Views(serials=list(serials), K=np.stack([intrinsics[s] for s in serials]),
                 world_2_cam=np.stack([world_2_cam[s] for s in serials]), width=width, height=height, device=device)


def rig_centre(views: Views) -> np.ndarray:
    """The point closest (least squares) to every optical axis: where a rig's cameras converge on the subject."""
    normal_sum = np.zeros((3, 3))
    rhs = np.zeros(3)
    for centre, axis in zip(views.centres, views.axes):
        projector = np.eye(3) - np.outer(axis, axis)
        normal_sum += projector
        rhs += projector @ centre
    if np.linalg.matrix_rank(normal_sum) < 3:  # all axes parallel: fall back to a metre in front of the mean camera
        return views.centres.mean(0) + views.axes.mean(0)
    return np.linalg.solve(normal_sum, rhs)


def angles_between_axes(views: Views) -> np.ndarray:
    """(C, C) angle in degrees between every pair of optical axes."""
    cosines = np.clip(views.axes @ views.axes.T, -1.0, 1.0)
    return np.degrees(np.arccos(cosines))


def sees_point(views: Views, index: int, point: np.ndarray) -> bool:
    """True if the point is in front of the camera and inside its frame."""
    in_camera = views.world_2_cam[index, :3, :3] @ point + views.world_2_cam[index, :3, 3]
    if in_camera[2] <= 0:
        return False
    u, v, w = views.K[index] @ in_camera
    return bool(0 <= u / w < views.width and 0 <= v / w < views.height)


def _apply(matrix: torch.Tensor, offset: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``points @ matrix.T + offset`` for (..., 3) points, computed channel-first: several times faster on CPU
    than a matmul whose inner dimension is 3."""
    flat = points.reshape(-1, 3)
    return (matrix @ flat.T + offset[:, None]).T.reshape(points.shape[:-1] + (matrix.shape[0],))


def project(K: torch.Tensor, world_2_cam: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """World points (..., 3) -> pixel coordinates (..., 2) and z-depth (...) in one camera."""
    projection = K @ world_2_cam[:3]
    pixels = _apply(projection[:, :3], projection[:, 3], points)
    z = pixels[..., 2]  # K's last row is (0, 0, 1), so the homogeneous coordinate is the z-depth
    uv = pixels[..., :2] / z.clamp_min(1e-9)[..., None]
    return uv, z


def pixel_grid(width: int, height: int, device: torch.device, rows: slice = slice(None),
               cols: slice = slice(None)) -> torch.Tensor:
    """(h, w, 3) homogeneous pixel-centre coordinates (u, v, 1) of the given rows and columns."""
    ys = torch.arange(height, device=device, dtype=torch.float32)[rows] + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32)[cols] + 0.5
    v, u = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([u, v, torch.ones_like(u)], dim=-1)


def unproject(K: torch.Tensor, world_2_cam: torch.Tensor, uv1: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Homogeneous pixel coordinates (..., 3) with z-depth (...) -> world points (..., 3)."""
    cam_2_world = torch.linalg.inv(world_2_cam)
    to_world = cam_2_world[:3, :3] @ torch.linalg.inv(K)
    return _apply(to_world, torch.zeros(3, device=uv1.device), uv1 * depth[..., None]) + cam_2_world[:3, 3]


def relative_pose(world_2_ref: np.ndarray, world_2_src: np.ndarray) -> np.ndarray:
    """4x4 taking reference-camera coordinates to source-camera coordinates."""
    return world_2_src @ invert_pose(world_2_ref)


def sample_nearest(image: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of an (H, W) image at the pixels containing ``uv`` (..., 2), and whether each is inside it."""
    height, width = image.shape
    cols = torch.floor(uv[..., 0])
    rows = torch.floor(uv[..., 1])
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    flat = (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)).long()
    return image.reshape(-1)[flat], inside
