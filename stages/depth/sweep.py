"""Plane-sweep stereo for one reference view: windowed NCC against warped sources, best-k aggregation.

Coarse to fine. On the coarsest pyramid level every pixel is tried on fronto-parallel planes spanning its
visual-hull interval: each source image is warped onto a plane with the plane's homography and compared
with the reference by normalised cross-correlation over a window (separable window sums, weighted by the
reference's matte). Each finer level only tries a few inverse-depth steps around the upsampled coarser answer,
warping every pixel at its own hypothesis, so the support window follows the surface instead of a plane.
That keeps the work per level proportional to its pixels, not to pixels times planes.

The k best sources per hypothesis are averaged, which ignores a source that is occluded at that pixel
without having to know which one it is. The best hypothesis is refined below the step with a parabola.
Work is done in row strips sized to a memory budget, so a full-size frame never needs a full volume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stages.geometry.views import Views, pixel_grid, relative_pose
from stages.geometry.hull import Hull, depth_bounds

INVALID_SCORE = -2.0  # below any NCC: hypotheses outside a pixel's hull interval, windows leaving a source
VARIANCE_EPS = 1e-6  # keeps the NCC finite on flat windows (their score is near 0 and fails min_ncc)
MIN_SUPPORT = 0.25  # a window needs at least this fraction of its pixels on the subject (by the matte)


@dataclass(frozen=True)
class SweepSettings:
    """The parts of the depth config the sweep needs, as plain values."""

    window: int
    best_k: int
    min_ncc: float
    min_texture: float  # std of the reference window, grey levels in [0, 1]
    max_step_px: float  # hypotheses are this far apart in the widest-baseline source
    min_planes: int
    max_planes: int
    coarse_size: int  # the coarsest level's longer side, in pixels
    refine_steps: int  # hypotheses each side of the coarser answer on finer levels
    volume_mb: float


@dataclass(frozen=True)
class SweepResult:
    depth: torch.Tensor  # (H, W) z-depth in metres, 0 = no confident answer
    score: torch.Tensor  # (H, W) aggregated NCC of the answer, 0 where none
    planes: int  # planes swept on the coarsest level


@dataclass(frozen=True)
class Pyramid:
    """Every camera's grey image and matte at each level, finest first, with the cameras resized to match."""

    views: list[Views]
    greys: list[torch.Tensor]  # per level: (C, h, w) in [0, 1]
    mattes: list[torch.Tensor]  # per level: (C, h, w) in [0, 1]

    def level(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.greys[index], self.mattes[index]


# --- images and levels -------------------------------------------------------------------------------------


def to_grey(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., H, W) float32 luma in [0, 1]."""
    rgb = torch.as_tensor(frames, device=device).float() / 255.0
    return rgb @ torch.tensor([0.299, 0.587, 0.114], device=device)


def level_count(width: int, height: int, coarse_size: int) -> int:
    """How many halvings bring the longer side down to ``coarse_size`` or below."""
    longest = max(width, height)
    return max(0, int(np.ceil(np.log2(longest / coarse_size)))) if longest > coarse_size else 0


def build_pyramid(views: Views, greys: torch.Tensor, mattes: torch.Tensor, coarse_size: int) -> Pyramid:
    """Area-averaged halvings of (C, H, W) grey images and mattes; K follows each resize exactly."""
    levels_views, levels_greys, levels_mattes = [views], [greys], [mattes]
    for _ in range(level_count(views.width, views.height, coarse_size)):
        width, height = max(1, round(levels_views[-1].width / 2)), max(1, round(levels_views[-1].height / 2))
        levels_greys.append(F.adaptive_avg_pool2d(levels_greys[-1][:, None], (height, width))[:, 0])
        levels_mattes.append(F.adaptive_avg_pool2d(levels_mattes[-1][:, None], (height, width))[:, 0])
        levels_views.append(views.resized(width, height))
    return Pyramid(levels_views, levels_greys, levels_mattes)


# --- geometry of hypotheses ----------------------------------------------------------------------------------


def _source_maps(views: Views, ref: int, src: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) with source pixel ~ d * A @ p + b for reference pixel p (homogeneous) at z-depth d."""
    pose = relative_pose(views.world_2_cam[ref], views.world_2_cam[src])
    A = views.K[src] @ pose[:3, :3] @ np.linalg.inv(views.K[ref])
    b = views.K[src] @ pose[:3, 3]
    return (torch.as_tensor(A, dtype=torch.float32, device=views.device),
            torch.as_tensor(b, dtype=torch.float32, device=views.device))


def _project(A: torch.Tensor, b: torch.Tensor, pixels: torch.Tensor, depths: torch.Tensor) -> torch.Tensor:
    """Source pixel coordinates (N, ..., 2) of reference ``pixels`` (..., 3) at z-depths broadcastable to (N, ...)."""
    rays = pixels @ A.T
    homogeneous = depths[..., None] * rays + b
    return homogeneous[..., :2] / homogeneous[..., 2:3].clamp_min(1e-9)


def inverse_depth_step(views: Views, ref: int, sources: list[int], pixels: torch.Tensor, near: float, far: float,
                       max_step_px: float) -> float:
    """The inverse-depth step that moves a reference pixel ``max_step_px`` in the widest-baseline source."""
    depths = torch.tensor([near, far], device=views.device).view(2, 1)
    travel = 0.0
    for src in sources:
        ends = _project(*_source_maps(views, ref, src), pixels, depths)
        travel = max(travel, float((ends[1] - ends[0]).norm(dim=-1).median()))
    return (1.0 / near - 1.0 / far) / max(travel / max_step_px, 1e-9)


# --- scoring ---------------------------------------------------------------------------------------------


def _shifted_sum(images: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Sum of each element and its ``radius`` neighbours either side along ``dim``, zeros beyond the edge."""
    out = images.clone()
    length = images.shape[dim]
    for shift in range(1, min(radius, length - 1) + 1):
        out.narrow(dim, 0, length - shift).add_(images.narrow(dim, shift, length - shift))
        out.narrow(dim, shift, length - shift).add_(images.narrow(dim, 0, length - shift))
    return out


def _window_sum(images: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over the window around each pixel of (N, h, w) images; separable shifted adds beat avg_pool on CPU."""
    return _shifted_sum(_shifted_sum(images, window // 2, -1), window // 2, -2)


def _warp(source: torch.Tensor, A: torch.Tensor, b: torch.Tensor, pixels: torch.Tensor, depths: torch.Tensor,
          margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The source image at reference ``pixels`` (h, w, 3) lifted to ``depths`` (broadcastable to (N, h, w)),
    sampled bilinearly, and where a whole window around the sample lies inside the source."""
    height, width = source.shape
    rays = pixels @ A.T
    depth_z = (depths * rays[..., 2] + b[2]).clamp_min(1e-9)
    u = (depths * rays[..., 0] + b[0]) / depth_z
    v = (depths * rays[..., 1] + b[1]) / depth_z
    grid = torch.stack([u * (2.0 / width) - 1.0, v * (2.0 / height) - 1.0], dim=-1)
    warped = F.grid_sample(source[None, None], grid.reshape(1, -1, grid.shape[-2], 2), mode="bilinear",
                           padding_mode="border", align_corners=False)
    inside = ((u - width / 2).abs() <= width / 2 - margin) & ((v - height / 2).abs() <= height / 2 - margin)
    return warped.reshape(u.shape), inside


@dataclass(frozen=True)
class _Window:
    """Matte-weighted statistics of the reference over one region.

    Weighting every window by the reference's matte keeps the backdrop out of windows on the silhouette:
    the backdrop moves differently from the subject between views, so it would drag those scores down.
    """

    weight: torch.Tensor  # (h, w) matte in [0, 1]
    weighted: torch.Tensor  # (h, w) weight * image
    weight_sum: torch.Tensor  # (h, w) sum of weights in each window
    mean: torch.Tensor
    std: torch.Tensor
    size: int

    @classmethod
    def of(cls, image: torch.Tensor, weight: torch.Tensor, size: int) -> _Window:
        weight_sum = _window_sum(weight[None], size)[0].clamp_min(1e-6)
        weighted = weight * image
        mean = _window_sum(weighted[None], size)[0] / weight_sum
        variance = _window_sum((weighted * image)[None], size)[0] / weight_sum - mean * mean
        return cls(weight, weighted, weight_sum, mean, variance.clamp_min(0).sqrt(), size)

    def ncc(self, warped: torch.Tensor) -> torch.Tensor:
        """(N, h, w) weighted NCC between the reference and each warped source image."""
        weighted = warped * self.weight
        mean = _window_sum(weighted, self.size) / self.weight_sum
        variance = (_window_sum(weighted * warped, self.size) / self.weight_sum - mean * mean).clamp_min(0)
        covariance = _window_sum(warped * self.weighted, self.size) / self.weight_sum - mean * self.mean
        return covariance / (self.std * variance.sqrt() + VARIANCE_EPS)


def _aggregate(scores: torch.Tensor, best_k: int) -> torch.Tensor:
    """Mean of the ``best_k`` highest source scores per hypothesis and pixel: occluded sources drop out."""
    count = scores.shape[0]
    k = min(best_k, count)
    if k == count:
        return scores.mean(0)
    if k == count - 1:  # the common case, and much cheaper than topk on CPU
        return (scores.sum(0) - scores.min(0).values) / k
    return scores.topk(k, dim=0).values.mean(0)


def _score_region(level: Views, ref: int, pyramid_level: tuple[torch.Tensor, torch.Tensor], sources: list[int],
                  rows: slice, cols: slice, inverse: torch.Tensor,
                  settings: SweepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregated NCC (N, h, w) of inverse-depth hypotheses (broadcastable to (N, h, w)) over a region, and
    where the reference window has enough texture and matte support to be trusted."""
    greys, weights = pyramid_level
    pixels = pixel_grid(level.width, level.height, level.device, rows, cols)
    window = _Window.of(greys[ref, rows, cols], weights[ref, rows, cols], settings.window)
    depths = 1.0 / inverse
    margin = settings.window / 2
    scores = []
    for src in sources:
        warped, inside = _warp(greys[src], *_source_maps(level, ref, src), pixels, depths, margin)
        ncc = window.ncc(warped)
        scores.append(torch.where(inside, ncc, torch.full_like(ncc, INVALID_SCORE)))
        del warped, inside, ncc
    trusted = (window.std >= settings.min_texture) & (window.weight_sum >= MIN_SUPPORT * settings.window ** 2)
    return _aggregate(torch.stack(scores), settings.best_k), trusted


def _refine(volume: torch.Tensor, inverse: torch.Tensor,
            step: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best hypothesis per pixel moved to the vertex of the parabola through it and its two neighbours.

    Returns inverse depth, score, and whether the best was an interior hypothesis (one at the end of the
    search range may only be the edge of a slope that peaks outside it).
    """
    count = volume.shape[0]
    best, index = volume.max(0)
    before = volume.gather(0, (index - 1).clamp_min(0)[None])[0]
    after = volume.gather(0, (index + 1).clamp_max(count - 1)[None])[0]
    curvature = before - 2 * best + after
    interior = (index > 0) & (index < count - 1) & (before > INVALID_SCORE) & (after > INVALID_SCORE)
    usable = interior & (curvature < 0)
    offset = torch.where(usable, 0.5 * (before - after) / torch.where(usable, curvature, -1.0), 0.0).clamp(-0.5, 0.5)
    chosen = inverse.expand_as(volume).gather(0, index[None])[0]
    return chosen + offset * step, best, interior


# --- levels ---------------------------------------------------------------------------------------------


def _bbox(mask: torch.Tensor) -> tuple[slice, slice]:
    """Rows and columns of the mask's bounding box: only that part of a view is searched."""
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _strips(mask: torch.Tensor, hypotheses: int, sources: int,
            settings: SweepSettings) -> Iterator[tuple[slice, slice, slice, slice]]:
    """(rows, cols, rows with halo, cols with halo) of strips covering the mask's bounding box within budget."""
    rows, cols = _bbox(mask)
    halo = settings.window // 2
    height, width = mask.shape
    c0, c1 = max(0, cols.start - halo), min(width, cols.stop + halo)
    floats_per_row = (c1 - c0) * hypotheses * (sources + 8)
    step = max(settings.window, int(settings.volume_mb * 1e6 / 4 / floats_per_row))
    for start in range(rows.start, rows.stop, step):
        stop = min(rows.stop, start + step)
        yield (slice(start, stop), cols, slice(max(0, start - halo), min(height, stop + halo)), slice(c0, c1))


def _search(level: Views, ref: int, images: tuple[torch.Tensor, torch.Tensor], sources: list[int],
            searched: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
            hypotheses: Callable[[slice, slice], torch.Tensor], step: float, count: int,
            settings: SweepSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse depth, score and a keep-mask for one level, strip by strip.

    ``hypotheses(rows, cols)`` gives the inverse depths to try for a region, broadcastable to (N, h, w).
    """
    inverse = torch.zeros(level.height, level.width, device=level.device)
    score = torch.full_like(inverse, INVALID_SCORE)
    keep = torch.zeros_like(inverse, dtype=torch.bool)
    for rows, cols, rows_halo, cols_halo in _strips(searched, count, len(sources), settings):
        candidates = hypotheses(rows_halo, cols_halo)
        volume, trusted = _score_region(level, ref, images, sources, rows_halo, cols_halo, candidates, settings)
        crop = (slice(None), slice(rows.start - rows_halo.start, rows.stop - rows_halo.start),
                slice(cols.start - cols_halo.start, cols.stop - cols_halo.start))
        volume, candidates = volume[crop], candidates.expand(-1, *volume.shape[1:])[crop]
        depth = 1.0 / candidates
        in_hull = (depth >= near[rows, cols]) & (depth <= far[rows, cols])
        volume = torch.where(in_hull, volume, torch.full_like(volume, INVALID_SCORE))
        inverse[rows, cols], score[rows, cols], interior = _refine(volume, candidates, step)
        keep[rows, cols] = interior & trusted[crop[1:]] & searched[rows, cols]
    return inverse, score, keep


def _plane_sweep(level: Views, ref: int, images: tuple[torch.Tensor, torch.Tensor], sources: list[int],
                 near: torch.Tensor, far: torch.Tensor,
                 settings: SweepSettings) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fronto-parallel planes over the hull's depth range: every pixel is tried at every plane it can hold."""
    searched = (near > 0) & (far > near)
    lo, hi = float(near[searched].min()), float(far[searched].max())
    sample = pixel_grid(level.width, level.height, level.device)[searched]
    step = inverse_depth_step(level, ref, sources, sample[:: max(1, sample.shape[0] // 2000)], lo, hi,
                              settings.max_step_px)
    count = int(np.clip(np.ceil((1.0 / lo - 1.0 / hi) / step) + 1, settings.min_planes, settings.max_planes))
    planes = torch.linspace(1.0 / lo, 1.0 / hi, count, dtype=torch.float64).float().to(level.device)
    step = float(planes[1] - planes[0]) if count > 1 else 0.0
    inverse, score, keep = _search(level, ref, images, sources, searched, near, far,
                                   lambda rows, cols: planes.view(-1, 1, 1), step, count, settings)
    return torch.where(keep, inverse, 0.0), score, count


def _local_search(level: Views, ref: int, images: tuple[torch.Tensor, torch.Tensor], sources: list[int],
                  start: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                  settings: SweepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """A few inverse-depth steps either side of each pixel's coarser answer (``start``, 0 = none)."""
    searched = (start > 0) & (near > 0) & (far > near)
    if not bool(searched.any()):
        return torch.zeros_like(start), torch.full_like(start, INVALID_SCORE)
    sample = pixel_grid(level.width, level.height, level.device)[searched]
    lo, hi = float(near[searched].min()), float(far[searched].max())
    step = inverse_depth_step(level, ref, sources, sample[:: max(1, sample.shape[0] // 2000)], lo, hi,
                              settings.max_step_px)
    offsets = torch.arange(-settings.refine_steps, settings.refine_steps + 1, device=level.device).float() * step
    fallback = 1.0 / max(lo, 1e-6)  # any finite value: pixels without a start are not kept

    def hypotheses(rows: slice, cols: slice) -> torch.Tensor:
        base = start[rows, cols]
        return torch.where(base > 0, base, fallback)[None] + offsets.view(-1, 1, 1)

    inverse, score, keep = _search(level, ref, images, sources, searched, near, far, hypotheses, step,
                                   offsets.numel(), settings)
    return torch.where(keep, inverse, 0.0), score


def _upsample(inverse: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Nearest-neighbour upsampling: no blending across depth edges or with invalid (0) pixels."""
    return F.interpolate(inverse[None, None], size=(height, width), mode="nearest")[0, 0]


def _refine_level(level: Views, ref: int, images: tuple[torch.Tensor, torch.Tensor], sources: list[int],
                  start: torch.Tensor, start_score: torch.Tensor, near: torch.Tensor, far: torch.Tensor,
                  settings: SweepSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """A local search around ``start``; where it finds no peak, a confident ``start`` stands (the consistency
    filter judges it later)."""
    refined, refined_score = _local_search(level, ref, images, sources, start, near, far, settings)
    fallback = (refined == 0) & (start_score >= settings.min_ncc) & (near > 0)
    return torch.where(fallback, start, refined), torch.where(fallback, start_score, refined_score)


def sweep_view(pyramid: Pyramid, ref: int, sources: list[int], hull: Hull, settings: SweepSettings) -> SweepResult:
    """Depth of one reference view from its source views, searched only inside the visual hull."""
    full = pyramid.views[0]
    zero = torch.zeros(full.height, full.width, device=full.device)
    coarsest = len(pyramid.views) - 1
    level = pyramid.views[coarsest]
    near, far = depth_bounds(level, ref, hull)
    if not sources or not bool(((near > 0) & (far > near)).any()):
        return SweepResult(zero, zero, 0)
    inverse, score, planes = _plane_sweep(level, ref, pyramid.level(coarsest), sources, near, far, settings)
    for index in range(coarsest - 1, -1, -1):
        level = pyramid.views[index]
        near, far = depth_bounds(level, ref, hull)
        inverse, score = _refine_level(level, ref, pyramid.level(index), sources,
                                       _upsample(inverse, level.height, level.width),
                                       _upsample(score, level.height, level.width), near, far, settings)
    confident = (inverse > 0) & (score >= settings.min_ncc)
    depth = torch.where(confident, 1.0 / inverse.clamp_min(1e-9), zero)
    return SweepResult(depth, torch.where(confident, score, zero), planes)
