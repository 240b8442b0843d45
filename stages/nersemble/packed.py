"""Segment operations on packed samples (flat arrays grouped by ray), shared by rendering and losses."""

from __future__ import annotations

import torch


def segment_cumsum(values: torch.Tensor, ray_indices: torch.Tensor, n_rays: int,
                   exclusive: bool = False) -> torch.Tensor:
    """Cumulative sum of ``values[S]`` restarting at each ray (samples must be grouped by ray).

    One global cumsum minus each ray's starting offset, in float64: in float32 the global running sum over
    ~1e5 samples would swallow the small per-ray terms that transmittance depends on. ``n_rays`` may be 0
    (then the largest ray index decides).
    """
    if values.numel() == 0:
        return values.clone()
    v = values.double()
    total = torch.cumsum(v, dim=0)
    before = total - v  # exclusive running sum
    counts = torch.bincount(ray_indices, minlength=n_rays)
    first = torch.cumsum(counts, 0) - counts  # first sample of each ray
    base = before[first.clamp(max=v.shape[0] - 1)][ray_indices]
    result = (before if exclusive else total) - base
    return result.to(values.dtype)


def segment_sum(values: torch.Tensor, ray_indices: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Per-ray sums of ``values[S, ...]`` -> ``[n_rays, ...]``."""
    out = torch.zeros((n_rays, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add(0, ray_indices, values)
