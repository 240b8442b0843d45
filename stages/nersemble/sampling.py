"""Instant-NGP style ray marching: constant steps inside the scene box, keeping only occupied cells.

Samples come back *packed*: flat arrays plus the ray each sample belongs to, grouped by ray and sorted by
distance within a ray. Every later stage (rendering, losses) relies on that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._random import rand
from .kernels.cpu import ops as cpu_ops


@dataclass
class RaySamples:
    """Packed intervals along rays, grouped by ray, sorted by ``t`` within a ray."""

    ray_indices: torch.Tensor  # [S] int64
    t_starts: torch.Tensor  # [S]
    t_ends: torch.Tensor  # [S]

    @property
    def t_mids(self) -> torch.Tensor:
        return 0.5 * (self.t_starts + self.t_ends)

    @property
    def deltas(self) -> torch.Tensor:
        return self.t_ends - self.t_starts

    def __len__(self) -> int:
        return self.ray_indices.shape[0]

    def select(self, keep: torch.Tensor) -> RaySamples:
        """The samples where ``keep`` is True (order preserved)."""
        return RaySamples(self.ray_indices[keep], self.t_starts[keep], self.t_ends[keep])

    def positions(self, rays_o: torch.Tensor, rays_d: torch.Tensor) -> torch.Tensor:
        """Interval midpoints in world space."""
        return rays_o[self.ray_indices] + rays_d[self.ray_indices] * self.t_mids[:, None]


def ray_aabb_intersect(rays_o: torch.Tensor, rays_d: torch.Tensor,
                       aabb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab test: entry and exit distances ``[N]``; a miss has ``t_far < t_near``.

    Zero direction components divide to +-inf, which the min/max handle (a ray parallel to a slab inside it
    is unconstrained by it; outside it, the inf/nan makes it miss).
    """
    inv = 1.0 / rays_d
    t0 = (aabb[0] - rays_o) * inv
    t1 = (aabb[1] - rays_o) * inv
    t_near = torch.minimum(t0, t1).nan_to_num(nan=float("inf")).amax(dim=-1)
    t_far = torch.maximum(t0, t1).nan_to_num(nan=-float("inf")).amin(dim=-1)
    return t_near, t_far


def march_rays(
    rays_o: torch.Tensor,
    rays_d: torch.Tensor,
    aabb: torch.Tensor,
    step_size: float,
    near_plane: float = 0.0,
    far_plane: float = float("inf"),
    occupied: torch.Tensor | None = None,
    stratified: bool = False,
    generator: torch.Generator | None = None,
    fused: bool = False,
) -> RaySamples:
    """Intervals ``[t0 + k dt, t0 + (k+1) dt]`` whose midpoint lies in the box and in an occupied cell.

    ``t0`` is the near plane, jittered by U(0, dt) per ray when ``stratified`` (training). Steps are
    anchored at the near plane, not at the box entry, so a ray's sample lattice does not depend on the box.
    ``occupied`` is an ``[R, R, R]`` bool grid over ``aabb`` (None: everything). Every occupied interval is
    returned: early ray termination (``sampler.early_stop_eps`` > 0, off in ``paper``) is the model's
    culling pass (``NeRSembleModel.sample``), not this function's. ``fused`` runs the occupancy test in the
    Triton marcher (:func:`.kernels.cuda.packed.march_occupied`, the caller checks it can run here).
    """
    n_rays = rays_o.shape[0]
    device = rays_o.device
    t0 = torch.full((n_rays,), float(near_plane), device=device, dtype=rays_o.dtype)
    if stratified:
        t0 = t0 + rand((n_rays,), device, generator).to(rays_o.dtype) * step_size
    t_near, t_far = ray_aabb_intersect(rays_o, rays_d, aabb)
    lo = torch.maximum(t_near, t0)
    hi = torch.minimum(t_far, torch.full_like(t_far, float(far_plane)))
    # Midpoint t0 + (k + 1/2) dt must fall in [lo, hi]: k from ceil(.) to floor(.).
    k_first = torch.ceil((lo - t0) / step_size - 0.5).clamp(min=0)
    k_last = torch.floor((hi - t0) / step_size - 0.5)
    counts = (k_last - k_first + 1).clamp(min=0)
    counts = torch.where(torch.isfinite(counts), counts, torch.zeros_like(counts)).long()
    if occupied is not None and fused:
        from .kernels.cuda.packed import march_occupied  # noqa: PLC0415 - triton is optional

        return RaySamples(*march_occupied(rays_o, rays_d, t0, k_first, counts, step_size, aabb, occupied))
    if occupied is not None and cpu_ops.applies(rays_o, rays_d, t0):
        # One C pass per ray: unoccupied samples are never materialised (this function is its twin).
        return RaySamples(*cpu_ops.march_occupied(rays_o, rays_d, t0, k_first, counts, step_size, aabb, occupied))
    ray_indices = torch.repeat_interleave(torch.arange(n_rays, device=device), counts)
    first_sample = torch.cumsum(counts, 0) - counts
    k = k_first.long()[ray_indices] + torch.arange(ray_indices.shape[0], device=device) - first_sample[ray_indices]
    t_starts = t0[ray_indices] + k.to(rays_o.dtype) * step_size
    samples = RaySamples(ray_indices, t_starts, t_starts + step_size)
    if occupied is None:
        return samples
    unit = (samples.positions(rays_o, rays_d) - aabb[0]) / (aabb[1] - aabb[0])
    r = torch.tensor(occupied.shape, device=device)
    ijk = torch.minimum((unit * r).long().clamp(min=0), r - 1)
    return samples.select(occupied[ijk[:, 0], ijk[:, 1], ijk[:, 2]])
