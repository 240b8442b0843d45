"""Volume rendering of packed samples (nerfacc's functional API, plain torch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .packed import segment_cumsum, segment_sum


def render_weights(sigmas: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor,
                   n_rays: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w_i = T_i alpha_i`` with ``alpha_i = 1 - exp(-sigma_i dt_i)``, ``T_i = exp(-sum_{j<i} sigma_j dt_j)``.

    Returns weights, transmittances and alphas, each ``[S]``. Samples must be grouped by ray and sorted.
    """
    tau = sigmas * (t_ends - t_starts)
    alphas = 1.0 - torch.exp(-tau)
    transmittance = torch.exp(-segment_cumsum(tau, ray_indices, n_rays, exclusive=True))
    return transmittance * alphas, transmittance, alphas


@dataclass
class Composite:
    rgb: torch.Tensor  # [N, 3], over the background
    accumulation: torch.Tensor  # [N]
    depth: torch.Tensor  # [N], expected distance along the (unit) ray


def composite(weights: torch.Tensor, rgbs: torch.Tensor, t_mids: torch.Tensor, ray_indices: torch.Tensor,
              n_rays: int, background: torch.Tensor | tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Composite:
    """Colour over ``background``, accumulated opacity and expected depth (nerfstudio's renderers).

    Depth is ``sum w t / (sum w + 1e-10)`` clipped to the batch's ``[min t, max t]``, as nerfstudio's
    DepthRenderer does, so rays without samples get the batch's nearest sample distance.
    """
    background = torch.as_tensor(background, dtype=rgbs.dtype, device=rgbs.device)
    accumulation = segment_sum(weights, ray_indices, n_rays)
    rgb = segment_sum(weights[:, None] * rgbs, ray_indices, n_rays) + (1.0 - accumulation)[:, None] * background
    depth = segment_sum(weights * t_mids, ray_indices, n_rays) / (accumulation + 1e-10)
    if t_mids.numel():
        depth = torch.clip(depth, t_mids.min(), t_mids.max())
    return Composite(rgb, accumulation, depth)
