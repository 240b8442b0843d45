"""NeRSemble's training losses, each a small function of rendered rays or packed samples.

Every function returns the *unweighted* term; :func:`nersemble_losses` applies the config's lambdas and
returns the dict whose sum is the training loss (as upstream sums its loss dict). Depth targets are
per-ray distances in model units with 0 meaning "no depth"; upstream compares COLMAP *z*-depth with the
distance along the unit ray without conversion -- callers choose which one they pass (see the README).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .config import LossConfig
from .packed import segment_cumsum
from .sampling import RaySamples


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (over leading dims); 0 for an empty mask, with no device sync."""
    mask = mask.to(values.dtype)
    while mask.dim() < values.dim():
        mask = mask[..., None]
    count = mask.expand_as(values).sum()
    return (values * mask).sum() / count.clamp(min=1.0)


def rgb_loss(rgb: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor | None = None,
             threshold: float = 0.0) -> torch.Tensor:
    """MSE over rays x channels; with ``alpha``, only rays with alpha > threshold (pure background excluded)."""
    error = (rgb - target) ** 2
    return torch.mean(error) if alpha is None else masked_mean(error, alpha > threshold)


def alpha_loss(accumulation: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """L1 between accumulated opacity and the alpha map, on rays that are not fully opaque (alpha < 1)."""
    return masked_mean(torch.abs(accumulation - alpha), alpha < 1.0)


def empty_space_loss(weights: torch.Tensor, samples: RaySamples, depth_target: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """mean(w^2) over samples clearly in front of the surface: d > 0 and t_mid < d - eps."""
    d = depth_target[samples.ray_indices]
    return masked_mean(weights**2, (d > 0) & (samples.t_mids < d - eps))


def near_surface_loss(weights: torch.Tensor, samples: RaySamples, depth_target: torch.Tensor, eps: float,
                      n_rays: int, std_is_variance: bool = True) -> torch.Tensor:
    """mean((W_i - Phi((t_mid - d) / s))^2) over samples with |t_mid - d| <= eps, W_i the inclusive cumulative weight.

    Pushes the accumulated opacity towards a step at the depth target, smoothed by a Normal CDF. Upstream
    passes ``s = (eps / 3)^2`` -- the variance -- as the scale; ``std_is_variance`` keeps that quirk (the
    band then sharpens much faster than eps shrinks), False uses ``s = eps / 3``.
    """
    d = depth_target[samples.ray_indices]
    t = samples.t_mids
    mask = (d > 0) & (torch.abs(t - d) <= eps)
    cumulative = segment_cumsum(weights, samples.ray_indices, n_rays)
    scale = (eps / 3.0) ** 2 if std_is_variance else eps / 3.0
    cdf = 0.5 * (1.0 + torch.erf((t - d) / (scale * math.sqrt(2.0))))
    return masked_mean((cumulative - cdf) ** 2, mask)


def depth_loss(depth: torch.Tensor, depth_target: torch.Tensor) -> torch.Tensor:
    """Squared error of the expected ray depth on rays with a target (d > 0)."""
    return masked_mean((depth_target - depth) ** 2, depth_target > 0)


def distortion_loss(weights: torch.Tensor, samples: RaySamples, max_rays: int | None = None) -> torch.Tensor:
    """Mip-NeRF 360's distortion loss in O(n) per ray (torch_efficient_distloss ``flatten_eff_distloss``).

    Per ray ``sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 dt_i``; with sorted midpoints the double sum is
    ``2 sum_i w_i (m_i W_<i - S_<i)`` where W/S are exclusive prefix sums of w and w m. Summed over rays and
    divided by (largest ray index + 1), upstream's normalisation. Rays with index >= ``max_rays`` are left out.
    """
    ray_indices, m, dt = samples.ray_indices, samples.t_mids, samples.deltas
    if max_rays is not None:
        keep = ray_indices < max_rays
        ray_indices, m, dt, weights = ray_indices[keep], m[keep], dt[keep], weights[keep]
    if ray_indices.numel() == 0:
        return weights.sum() * 0.0
    n_rays = ray_indices.max() + 1  # a tensor: no device sync
    w_before = segment_cumsum(weights, ray_indices, 0, exclusive=True)
    wm_before = segment_cumsum(weights * m, ray_indices, 0, exclusive=True)
    bi = 2.0 * torch.sum(weights * m * w_before - weights * wm_before)
    uni = torch.sum(weights**2 * dt) / 3.0
    return (bi + uni) / n_rays


def nersemble_losses(outputs: Mapping[str, object], rgb_target: torch.Tensor, alpha_target: torch.Tensor | None,
                     depth_target: torch.Tensor | None, config: LossConfig, step: int) -> dict[str, torch.Tensor]:
    """The weighted loss dict for one training batch (sum it for the total).

    ``outputs`` is :meth:`NeRSembleModel.forward`'s dict; ``rgb_target`` is composited on white, alpha in
    [0, 1], depth per ray in model units (0 = invalid). Terms with a zero weight or without targets are left out.
    """
    rgb, acc, depth = outputs["rgb"], outputs["alpha"], outputs["depth"]
    weights, samples = outputs["weights"], outputs["samples"]
    n_rays = rgb.shape[0]
    losses = {"rgb": config.lambda_rgb * rgb_loss(rgb, rgb_target, alpha_target if config.masked_rgb else None,
                                                  config.alpha_mask_threshold)}
    if alpha_target is not None and config.lambda_alpha > 0:
        losses["alpha"] = config.lambda_alpha * alpha_loss(acc, alpha_target)
    if depth_target is not None:
        eps = config.depth_eps.value(step)
        if config.lambda_empty > 0:
            losses["empty"] = config.lambda_empty * empty_space_loss(weights, samples, depth_target, eps)
        if config.lambda_near > 0:
            losses["near"] = config.lambda_near * near_surface_loss(weights, samples, depth_target, eps, n_rays,
                                                                    config.near_std_is_variance)
        if config.lambda_depth > 0:
            losses["depth"] = config.lambda_depth * depth_loss(depth, depth_target)
    if config.lambda_distortion > 0:
        losses["distortion"] = config.lambda_distortion * distortion_loss(weights, samples, config.distortion_max_rays)
    return losses
