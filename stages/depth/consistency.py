"""Multi-view geometric consistency: keep a depth only where other views' depth maps say the same.

A wrong match in one view almost never lands on the same wrong 3D point as independent matches in two
other views, so requiring agreement (as COLMAP's filtered maps do) removes nearly every outlier while
keeping well-matched surface. Each reference pixel is lifted to 3D, projected into every other camera, and
compared with that camera's depth at the pixel it lands in, with a relative tolerance.
"""

from __future__ import annotations

import torch

from stages.geometry.views import Views, pixel_grid, project, sample_nearest, unproject


def agreeing_views(views: Views, depths: torch.Tensor, ref: int, tolerance: float) -> torch.Tensor:
    """(H, W) count of other cameras whose depth map agrees with the reference's depth within ``tolerance``."""
    depth = depths[ref]
    valid = depth > 0
    counts = torch.zeros(depth.shape, dtype=torch.int16, device=depth.device)
    if not bool(valid.any()):
        return counts
    pixels = pixel_grid(views.width, views.height, views.device)[valid]
    points = unproject(views.K_t(ref), views.world_2_cam_t(ref), pixels, depth[valid])
    agree = torch.zeros(points.shape[0], dtype=torch.int16, device=depth.device)
    for other in range(views.count):
        if other == ref:
            continue
        uv, z = project(views.K_t(other), views.world_2_cam_t(other), points)
        seen, inside = sample_nearest(depths[other], uv)
        close = (seen - z).abs() <= tolerance * z
        agree += (inside & (z > 0) & (seen > 0) & close).short()
    counts[valid] = agree
    return counts


def filter_consistent(views: Views, depths: torch.Tensor, tolerance: float, min_views: int) -> torch.Tensor:
    """(C, H, W) depths with every pixel that fewer than ``min_views`` other views confirm set to 0.

    All views are judged against the unfiltered maps, so the result does not depend on camera order.
    """
    out = torch.zeros_like(depths)
    for ref in range(views.count):
        keep = agreeing_views(views, depths, ref, tolerance) >= min_views
        out[ref] = torch.where(keep, depths[ref], out[ref])
    return out
