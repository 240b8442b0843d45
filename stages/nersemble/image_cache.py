"""Training images: the cameras and targets a trainer draws rays from, and the rotating cache that holds them.

Kept apart from the loop so that what feeds training (an :class:`ImageSource`: cameras plus ``load(view, t)``)
is read, tested and replaced without the optimiser in view. The trainer knows nothing about zarr or the work
folder; ``stages/optimize`` adapts the capture store to :class:`ImageSource`. As upstream (nerfstudio's cached
datamanager), rays are drawn uniformly from ``count`` images that the trainer redraws every
``train.repeat_images + 1`` steps, so memory holds a few images, never the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class TrainView:
    """One training camera: metric OpenCV ``K`` and ``world_2_cam`` for ``width`` x ``height`` frames."""

    K: np.ndarray
    world_2_cam: np.ndarray
    width: int
    height: int


@dataclass
class TrainImage:
    """One (camera, timestep) target: RGB uint8 (H, W, 3), alpha uint8 (H, W) or None, z-depth metres or None."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    depth: np.ndarray | None = None


class ImageSource(Protocol):
    """Where training images come from (the capture store in the pipeline, arrays in tests)."""

    views: list[TrainView]
    n_timesteps: int

    def load(self, view: int, timestep: int) -> TrainImage: ...


class ImageCache:
    """``count`` (view, timestep) images as tensors on the training device, redrawn on request."""

    def __init__(self, source: ImageSource, count: int, world_scale: float, depth_range_m: tuple[float, float],
                 device: torch.device, generator: torch.Generator, pairs: list[int] | None = None) -> None:
        self.source, self.count, self.device, self.generator = source, count, device, generator
        self.world_scale, self.depth_range_m = world_scale, depth_range_m
        self.K = torch.as_tensor(np.stack([v.K for v in source.views]), dtype=torch.float32, device=device)
        w2c = torch.as_tensor(np.stack([v.world_2_cam for v in source.views]), dtype=torch.float32, device=device)
        self.rotation = w2c[:, :3, :3]
        self.origin = -torch.einsum("cji,cj->ci", self.rotation, w2c[:, :3, 3]) * world_scale
        self.refresh(pairs)

    def refresh(self, pairs: list[int] | None = None) -> None:
        """Draw ``count`` new (view, timestep) pairs uniformly (with replacement, as random batches do).

        ``pairs`` (``view * n_timesteps + t``) reloads a given set instead: a resumed run continues with the
        images the interrupted one had, so resuming is exact.
        """
        n_views, n_t = len(self.source.views), self.source.n_timesteps
        if pairs is None:
            pairs = torch.randint(0, n_views * n_t, (self.count,), generator=self.generator).tolist()
        self.pairs = list(pairs)
        rgb, alpha, depth, views, times, widths = [], [], [], [], [], []
        for pair in self.pairs:
            view, t = divmod(pair, n_t)
            image = self.source.load(view, t)
            h, w = image.rgb.shape[:2]
            a = image.alpha if image.alpha is not None else np.full((h, w), 255, np.uint8)
            d = image.depth if image.depth is not None else np.zeros((h, w), np.float32)
            lo, hi = self.depth_range_m
            d = np.where((d >= lo) & (d <= hi), d, 0.0).astype(np.float32)
            rgb.append(torch.from_numpy(np.ascontiguousarray(image.rgb)).reshape(-1, 3))
            alpha.append(torch.from_numpy(np.ascontiguousarray(a)).reshape(-1))
            depth.append(torch.from_numpy(d).reshape(-1))
            views.append(view)
            times.append(t)
            widths.append(w)
            self.has_alpha = image.alpha is not None
            self.has_depth = image.depth is not None
        self.rgb = torch.cat(rgb).to(self.device)
        self.alpha = torch.cat(alpha).to(self.device)
        self.depth = torch.cat(depth).to(self.device)
        # Per image, not per pixel: a ray's image is found from its index among the concatenated pixels, which
        # keeps the cache at the images' own bytes (per-pixel view, time and pixel indices cost 32 bytes a pixel).
        counts = torch.tensor([r.shape[0] for r in rgb])
        self.image_start = (torch.cumsum(counts, 0) - counts).to(self.device)
        self.image_view = torch.tensor(views, dtype=torch.long, device=self.device)
        self.image_time = torch.tensor(times, dtype=torch.long, device=self.device)
        self.image_width = torch.tensor(widths, dtype=torch.long, device=self.device)

    def sample(self, n_rays: int) -> dict[str, torch.Tensor]:
        """A uniform ray batch: origins/directions in model units, targets on white, depth as distance."""
        idx = torch.randint(0, self.rgb.shape[0], (n_rays,), generator=self.generator).to(self.device)
        image = torch.searchsorted(self.image_start, idx, right=True) - 1
        view, pixel, width = self.image_view[image], idx - self.image_start[image], self.image_width[image]
        u = (pixel % width).float() + 0.5
        v = torch.div(pixel, width, rounding_mode="floor").float() + 0.5
        K = self.K[view]
        y = (v - K[:, 1, 2]) / K[:, 1, 1]
        x = (u - K[:, 0, 2] - K[:, 0, 1] * y) / K[:, 0, 0]
        cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)
        cam = cam / torch.linalg.norm(cam, dim=-1, keepdim=True)
        directions = torch.einsum("nj,nji->ni", cam, self.rotation[view])  # R^T d
        alpha = self.alpha[idx].float() / 255.0
        rgb = self.rgb[idx].float() / 255.0
        z = self.depth[idx]
        return {
            "origins": self.origin[view],
            "directions": directions,
            "timesteps": self.image_time[image],
            "rgb": rgb * alpha[:, None] + (1.0 - alpha[:, None]),  # composited on the white background
            "alpha": alpha if self.has_alpha else None,
            # z-depth -> distance along the unit ray, in model units (0 stays "no depth")
            "depth": (z / cam[:, 2] * self.world_scale) if self.has_depth else None,
        }
