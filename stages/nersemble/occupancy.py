"""A time-agnostic occupancy grid for a dynamic scene (nerfacc's OccGridEstimator, one level, plain torch).

Cells are probed at random timesteps, and the EMA keeps the maximum, so a cell stays occupied if it was
occupied at *any* recently sampled timestep. Cells seen by fewer than two training cameras are masked out
for good: nothing there can be constrained, and that is where floaters would grow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ._random import rand, randint
from .config import OccupancyConfig


class OccupancyGrid(nn.Module):
    """``occs`` (EMA of density * step), its binarisation and a static visibility mask over the scene box.

    Cell (i, j, k) covers ``box_min + extent * ([i, j, k] + [0, 1]) / R``; flat index ``(i * R + j) * R + k``.
    """

    def __init__(self, scene_box: torch.Tensor, config: OccupancyConfig) -> None:
        super().__init__()
        self.config = config
        r = config.resolution
        self.register_buffer("scene_box", torch.as_tensor(scene_box, dtype=torch.float32).clone())
        self.register_buffer("occs", torch.zeros(r**3))
        self.register_buffer("binary", torch.ones(r, r, r, dtype=torch.bool))  # all occupied until updated
        self.register_buffer("visible", torch.ones(r, r, r, dtype=torch.bool))

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def occupied(self) -> torch.Tensor:
        """The mask ray marching uses: occupied AND visible in enough training cameras ([R, R, R] bool)."""
        return self.binary & self.visible

    def alpha_threshold(self, alpha_threshold: float) -> float:
        """Training-time culling threshold ``min(alpha_threshold, mean(occs))`` (nerfacc)."""
        return min(alpha_threshold, float(self.occs.mean()))

    def set_visibility(self, mask: torch.Tensor) -> None:
        self.visible.copy_(mask.to(self.visible.device).view_as(self.visible))

    def is_update_step(self, step: int) -> bool:
        return self.config.enabled and step % self.config.update_every == 0

    def cell_points(self, cell_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One uniformly jittered world point inside each cell."""
        r = self.resolution
        ijk = torch.stack([cell_ids // (r * r), (cell_ids // r) % r, cell_ids % r], dim=-1).float()
        unit = (ijk + rand(tuple(ijk.shape), ijk.device, generator)) / r
        return self.scene_box[0] + unit * (self.scene_box[1] - self.scene_box[0])

    def cells_to_probe(self, step: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """All cells during warm-up, else R^3/4 random cells plus up to R^3/4 currently occupied cells."""
        n_cells = self.resolution**3
        device = self.occs.device
        if step < self.config.warmup_steps:
            return torch.arange(n_cells, device=device)
        quarter = n_cells // 4
        uniform = randint(n_cells, (quarter,), device, generator)
        occupied = torch.nonzero(self.binary.view(-1))[:, 0]
        if occupied.numel() > quarter:
            occupied = occupied[randint(occupied.numel(), (quarter,), device, generator)]
        return torch.cat([uniform, occupied])

    @torch.no_grad()
    def update(self, step: int, occ_eval_fn: Callable[[torch.Tensor], torch.Tensor],
               generator: torch.Generator | None = None, chunk: int = 1 << 18) -> bool:
        """Probe cells (on update steps only) and refresh the EMA and the binary grid; True if it updated.

        ``occ_eval_fn(points[N, 3]) -> [N]`` returns density * step size at world points; for a dynamic
        scene it evaluates each point at its own random timestep.
        """
        if not self.is_update_step(step):
            return False
        cell_ids = self.cells_to_probe(step, generator)
        values = torch.cat([occ_eval_fn(self.cell_points(ids, generator)).float().view(-1)
                            for ids in cell_ids.split(chunk)])
        decayed = torch.maximum(self.occs[cell_ids] * self.config.ema_decay, values)
        # scatter amax keeps duplicates deterministic (nerfacc's plain assignment lets the last one win).
        self.occs.scatter_reduce_(0, cell_ids, decayed, reduce="amax", include_self=False)
        threshold = torch.clamp(self.occs.mean(), max=self.config.occ_threshold)
        self.binary.copy_((self.occs > threshold).view_as(self.binary))
        return True

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """Whether each world position lies in an occupied, visible cell (False outside the box)."""
        unit = (positions - self.scene_box[0]) / (self.scene_box[1] - self.scene_box[0])
        inside = ((unit >= 0.0) & (unit <= 1.0)).all(dim=-1)
        r = self.resolution
        ijk = torch.clamp((unit * r).long(), 0, r - 1)
        mask = self.occupied()
        return mask[ijk[:, 0], ijk[:, 1], ijk[:, 2]] & inside


def frustum_visibility_mask(
    scene_box: torch.Tensor | np.ndarray,
    resolution: int,
    intrinsics: Sequence[np.ndarray | torch.Tensor],
    world_2_cams: Sequence[np.ndarray | torch.Tensor],
    sizes: Sequence[tuple[int, int]],
    min_cameras: int = 2,
    points: str = "lattice",
) -> torch.Tensor:
    """Cells inside at least ``min_cameras`` training-camera frusta, ``[R, R, R]`` bool.

    Cameras are OpenCV pinholes (K, world_2_cam, (width, height)) in the same units as ``scene_box``; each
    test is the 4 side half-spaces (near/far ignored, which also rejects points behind the camera).
    ``points="lattice"`` tests ``linspace(box_min, box_max, R)`` per axis as upstream does -- grid end points,
    up to half a cell off the cell centres; ``"centers"`` tests the cell centres instead.
    """
    box = torch.as_tensor(np.asarray(scene_box, dtype=np.float64) if not torch.is_tensor(scene_box) else scene_box,
                          dtype=torch.float64).cpu()
    if points == "lattice":
        axes = [torch.linspace(float(box[0, d]), float(box[1, d]), resolution, dtype=torch.float64) for d in range(3)]
    elif points == "centers":
        axes = [box[0, d] + (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution * (box[1, d] - box[0, d])
                for d in range(3)]
    else:
        raise ValueError(f"unknown points {points!r}")
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).view(-1, 3)
    count = torch.zeros(grid.shape[0], dtype=torch.int32)
    for K, w2c, (width, height) in zip(intrinsics, world_2_cams, sizes, strict=True):
        K = torch.as_tensor(np.asarray(K) if not torch.is_tensor(K) else K, dtype=torch.float64).cpu()
        w2c = torch.as_tensor(np.asarray(w2c) if not torch.is_tensor(w2c) else w2c, dtype=torch.float64).cpu()
        cam = grid @ w2c[:3, :3].T + w2c[:3, 3]
        u = K[0, 0] * cam[:, 0] + K[0, 1] * cam[:, 1] + K[0, 2] * cam[:, 2]  # = pixel u * z
        v = K[1, 1] * cam[:, 1] + K[1, 2] * cam[:, 2]
        z = cam[:, 2]
        seen = (u >= 0) & (u <= width * z) & (v >= 0) & (v <= height * z)
        count += seen.int()
    return (count >= min_cameras).view(resolution, resolution, resolution)
