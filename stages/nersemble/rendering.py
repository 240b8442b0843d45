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


def accumulate_along_rays(sigmas: torch.Tensor, rgbs: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                          ray_indices: torch.Tensor, n_rays: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights ``[S]`` and the per-ray sums ``sum w`` ``[N]``, ``sum w c`` ``[N, 3]``, ``sum w t_mid`` ``[N]``.

    The torch twin of :func:`.kernels.cuda.packed.composite_packed`, which fuses the same steps.
    """
    weights, _, _ = render_weights(sigmas, t_starts, t_ends, ray_indices, n_rays)
    t_mids = 0.5 * (t_starts + t_ends)
    accumulation = segment_sum(weights, ray_indices, n_rays)
    rgb_sum = segment_sum(weights[:, None] * rgbs, ray_indices, n_rays)
    return weights, accumulation, rgb_sum, segment_sum(weights * t_mids, ray_indices, n_rays)


def render_samples(sigmas: torch.Tensor, rgbs: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                   ray_indices: torch.Tensor, n_rays: int,
                   background: torch.Tensor | tuple[float, float, float] = (1.0, 1.0, 1.0),
                   fused: bool = False) -> tuple[torch.Tensor, Composite]:
    """Weights ``[S]`` and the :class:`Composite` of packed samples; ``fused`` runs the Triton kernel instead of the
    torch twin (the caller checks that the kernels can run on these tensors)."""
    if fused:
        from .kernels.cuda.packed import composite_packed  # noqa: PLC0415 - triton is optional

        weights, accumulation, rgb_sum, depth_sum = composite_packed(sigmas, rgbs, t_starts, t_ends, ray_indices,
                                                                     n_rays)
    else:
        weights, accumulation, rgb_sum, depth_sum = accumulate_along_rays(sigmas, rgbs, t_starts, t_ends,
                                                                          ray_indices, n_rays)
    return weights, finish_composite(accumulation, rgb_sum, depth_sum, 0.5 * (t_starts + t_ends), background)


def composite(weights: torch.Tensor, rgbs: torch.Tensor, t_mids: torch.Tensor, ray_indices: torch.Tensor,
              n_rays: int, background: torch.Tensor | tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Composite:
    """Colour over ``background``, accumulated opacity and expected depth (nerfstudio's renderers).

    Depth is ``sum w t / (sum w + 1e-10)`` clipped to the batch's ``[min t, max t]``, as nerfstudio's
    DepthRenderer does, so rays without samples get the batch's nearest sample distance.
    """
    return finish_composite(segment_sum(weights, ray_indices, n_rays),
                            segment_sum(weights[:, None] * rgbs, ray_indices, n_rays),
                            segment_sum(weights * t_mids, ray_indices, n_rays), t_mids, background)


def finish_composite(accumulation: torch.Tensor, rgb_sum: torch.Tensor, depth_sum: torch.Tensor,
                     t_mids: torch.Tensor, background: torch.Tensor | tuple[float, float, float]) -> Composite:
    """:func:`composite` from the per-ray sums: background behind ``1 - accumulation``, depth normalised and clipped."""
    background = torch.as_tensor(background, dtype=rgb_sum.dtype, device=rgb_sum.device)
    rgb = rgb_sum + (1.0 - accumulation)[:, None] * background
    depth = depth_sum / (accumulation + 1e-10)
    if t_mids.numel():
        depth = torch.clip(depth, t_mids.min(), t_mids.max())
    return Composite(rgb, accumulation, depth)
