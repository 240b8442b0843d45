"""The mattes' visual hull: where the subject can be, which bounds every pixel's depth search.

Stereo only has to find the surface inside the hull, so each pixel sweeps a short interval instead of the
whole working volume: fewer hypotheses to confuse it and a clear "no answer" where the hull is empty. The
hull is carved conservatively (a voxel survives if its footprint touches the dilated matte), so a correct
matte never carves away true surface; ``misses`` lets a camera or two with a bad matte be outvoted.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from stages.geometry.views import Views, project, rig_centre, sample_nearest

VOXEL_RADIUS = 0.87  # half a voxel's diagonal, in voxel sizes: a voxel's footprint reaches this far from its centre


@dataclass(frozen=True)
class Hull:
    """Occupied voxel centres (M, 3) on the working device, and the voxel size in metres."""

    points: torch.Tensor
    voxel: float

    @property
    def empty(self) -> bool:
        return self.points.shape[0] == 0


def working_box(views: Views) -> tuple[np.ndarray, np.ndarray]:
    """A cube around the rig centre as wide as the widest camera sees there: the subject cannot be outside it."""
    centre = rig_centre(views)
    half_extent = 0.0
    for index in range(views.count):
        K = views.K[index]
        corners_x = np.array([0.0, views.width]) - K[0, 2]
        corners_y = np.array([0.0, views.height]) - K[1, 2]
        tangent = np.hypot(np.abs(corners_x).max() / K[0, 0], np.abs(corners_y).max() / K[1, 1])
        distance = np.linalg.norm(views.centres[index] - centre)
        half_extent = max(half_extent, distance * tangent)
    return centre - half_extent, centre + half_extent


def outside_distance(masks: np.ndarray) -> np.ndarray:
    """(C, H, W) float32: per pixel, the distance in pixels to the nearest foreground pixel (0 on it)."""
    out = np.empty(masks.shape, np.float32)
    for index, mask in enumerate(masks):
        if not mask.any():
            out[index] = np.inf
            continue
        out[index] = cv2.distanceTransform(np.where(mask, 0, 255).astype(np.uint8), cv2.DIST_L2, 3)
    return out


def _voxel_centres(lo: np.ndarray, hi: np.ndarray, resolution: int, device: torch.device) -> tuple[torch.Tensor, float]:
    voxel = float(np.max(hi - lo) / resolution)
    axes = [torch.arange(resolution, device=device, dtype=torch.float32) * voxel + float(lo[i]) + voxel / 2
            for i in range(3)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3), voxel


def _subdivide(points: torch.Tensor, voxel: float) -> tuple[torch.Tensor, float]:
    """The eight half-size children of every voxel."""
    offsets = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)],
                           dtype=points.dtype, device=points.device) * (voxel / 4)
    return (points[:, None, :] + offsets).reshape(-1, 3), voxel / 2


def carve(views: Views, distance: torch.Tensor, points: torch.Tensor, voxel: float, misses: int,
          dilation_px: float) -> torch.Tensor:
    """Which voxels at least two cameras see inside their matte and at most ``misses`` see outside it."""
    agree = torch.zeros(points.shape[0], dtype=torch.int16, device=views.device)
    disagree = torch.zeros_like(agree)
    for index in range(views.count):
        K = views.K_t(index)
        uv, z = project(K, views.world_2_cam_t(index), points)
        gap, inside = sample_nearest(distance[index], uv)
        seen = inside & (z > 0)
        reach = VOXEL_RADIUS * voxel * torch.maximum(K[0, 0], K[1, 1]) / z.clamp_min(1e-6) + dilation_px
        hit = gap <= reach
        agree += (seen & hit).short()
        disagree += (seen & ~hit).short()
    return (agree >= 2) & (disagree <= misses)


def visual_hull(views: Views, masks: np.ndarray, resolution: int, misses: int, dilation_px: float) -> Hull:
    """Carve a coarse grid over the working box, then only the children of what survived, twice.

    A child can only survive if its parent did (its footprint lies inside the parent's), so refining the
    survivors gives the same hull as carving the fine grid, at a fraction of the projections.
    """
    distance = torch.as_tensor(outside_distance(masks), device=views.device)
    lo, hi = working_box(views)
    points, voxel = _voxel_centres(lo, hi, max(4, resolution // 4), views.device)
    points = points[carve(views, distance, points, voxel, misses, dilation_px)]
    for _ in range(2):
        points, voxel = _subdivide(points, voxel)
        points = points[carve(views, distance, points, voxel, misses, dilation_px)]
    return Hull(points=points, voxel=voxel)


def depth_bounds(views: Views, index: int, hull: Hull) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel, the nearest and farthest z-depth of the hull along its ray, widened by a voxel; 0 where none.

    Each voxel is splatted as a square as wide as its largest footprint, so the bounds cover every ray that
    touches an occupied voxel.
    """
    height, width = views.height, views.width
    K = views.K_t(index)
    uv, z = project(K, views.world_2_cam_t(index), hull.points)
    cols, rows = torch.floor(uv[:, 0]), torch.floor(uv[:, 1])
    keep = (z > 0) & (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    zero = torch.zeros(height, width, device=views.device)
    if not bool(keep.any()):
        return zero, zero
    flat = (rows[keep] * width + cols[keep]).long()
    near = torch.full((height * width,), float("inf"), device=views.device).scatter_reduce(
        0, flat, z[keep], reduce="amin")
    far = torch.full((height * width,), float("-inf"), device=views.device).scatter_reduce(
        0, flat, z[keep], reduce="amax")
    radius = int(np.ceil(VOXEL_RADIUS * hull.voxel * float(torch.maximum(K[0, 0], K[1, 1])) / float(z[keep].min())))
    near = -window_max(-near.view(height, width), radius)
    far = window_max(far.view(height, width), radius)
    found = torch.isfinite(near) & torch.isfinite(far)
    near = torch.where(found, (near - hull.voxel).clamp_min(1e-6), zero)
    far = torch.where(found, far + hull.voxel, zero)
    return near, far


def window_max(image: torch.Tensor, radius: int) -> torch.Tensor:
    """Max over the (2 radius + 1)^2 square around each pixel of an (H, W) image, -inf beyond its edges.

    The same values as a stride-1 ``max_pool2d``, which takes (2 radius + 1)^2 comparisons per pixel. The radius
    is a voxel's footprint in pixels, which grows with the frame size, so that pooling's cost per pixel grew with
    the frame's area. One axis at a time, by doubling spans, it takes O(log radius) per pixel.
    """
    return _running_max(_running_max(image, radius, 1), radius, 0)


def _running_max(image: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Max over ``radius`` neighbours either side along ``dim``: maxima of spans 1, 2, 4, .. then two overlapping
    spans cover each window."""
    length, size = image.shape[dim], 2 * radius + 1
    edge = list(image.shape)
    edge[dim] = radius
    spans = torch.cat([image.new_full(edge, float("-inf")), image, image.new_full(edge, float("-inf"))], dim)
    span = 1  # spans[i] is the max of the padded image over [i, i + span)
    while 2 * span <= size:
        count = spans.shape[dim] - span
        spans = torch.maximum(spans.narrow(dim, 0, count), spans.narrow(dim, span, count))
        span *= 2
    return torch.maximum(spans.narrow(dim, 0, length), spans.narrow(dim, size - span, length))
