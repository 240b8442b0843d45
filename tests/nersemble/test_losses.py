"""Losses: the O(n) distortion loss against the O(n^2) definition, and the masks of the other terms."""

from __future__ import annotations

import math

import torch

from stages.nersemble.config import LossConfig
from stages.nersemble.losses import (
    alpha_loss,
    depth_loss,
    distortion_loss,
    empty_space_loss,
    near_surface_loss,
    nersemble_losses,
    rgb_loss,
)
from stages.nersemble.sampling import RaySamples


def _random_samples(counts, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    ray = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts, ends = [], []
    for c in counts.tolist():
        edges = torch.sort(torch.rand(c + 1, generator=g, dtype=torch.float64) * 5.0).values
        starts.append(edges[:-1])
        ends.append(edges[1:])
    samples = RaySamples(ray, torch.cat(starts), torch.cat(ends))
    weights = torch.rand(len(samples), generator=g, dtype=torch.float64) * 0.3
    return samples, weights


def _distortion_brute_force(weights, samples):
    n_rays = int(samples.ray_indices.max()) + 1
    total = 0.0
    m, dt = samples.t_mids, samples.deltas
    for r in range(n_rays):
        sel = samples.ray_indices == r
        w, mm, d = weights[sel], m[sel], dt[sel]
        total = total + (w[:, None] * w[None, :] * (mm[:, None] - mm[None, :]).abs()).sum() + (w**2 * d).sum() / 3
    return total / n_rays


def test_distortion_matches_quadratic_definition():
    samples, weights = _random_samples([7, 0, 12, 1, 30, 0, 5])
    weights.requires_grad_()
    fast = distortion_loss(weights, samples)
    slow = _distortion_brute_force(weights, samples)
    torch.testing.assert_close(fast, slow)
    (g_fast,) = torch.autograd.grad(fast, weights)
    (g_slow,) = torch.autograd.grad(slow, weights)
    torch.testing.assert_close(g_fast, g_slow)


def test_distortion_leaves_out_rays_past_the_limit():
    samples, weights = _random_samples([4, 6, 8])
    keep = samples.ray_indices < 2
    torch.testing.assert_close(distortion_loss(weights, samples, max_rays=2),
                               _distortion_brute_force(weights[keep], samples.select(keep)))


def test_rgb_and_alpha_masks():
    rgb = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    target = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    alpha = torch.tensor([1.0, 0.0, 0.5])
    assert float(rgb_loss(rgb, target, alpha)) == 0.5  # ray 1 is pure background: left out
    assert math.isclose(float(rgb_loss(rgb, target)), 2 / 3, rel_tol=1e-6)
    acc = torch.tensor([0.2, 0.3, 0.9])
    assert math.isclose(float(alpha_loss(acc, alpha)), (0.3 + 0.4) / 2, rel_tol=1e-6)  # ray 0 is opaque: left out
    assert float(alpha_loss(acc, torch.ones(3))) == 0.0  # empty mask: 0, not NaN


def test_depth_losses_select_the_right_samples():
    t = torch.arange(10, dtype=torch.float64)  # one ray, unit steps: mids 0.5 .. 9.5
    samples = RaySamples(torch.zeros(10, dtype=torch.long), t, t + 1)
    weights = torch.linspace(0.0, 0.09, 10, dtype=torch.float64)
    target = torch.tensor([5.0], dtype=torch.float64)
    # Empty space: mids < 5 - 1 = 4 -> samples 0..3.
    torch.testing.assert_close(empty_space_loss(weights, samples, target, 1.0), (weights[:4] ** 2).mean())
    # Near surface: |mid - 5| <= 1 -> mids 4.5, 5.5; Normal CDF with scale (eps/3)^2 (the upstream quirk).
    cumulative = torch.cumsum(weights, 0)
    for quirk, scale in [(True, (1.0 / 3) ** 2), (False, 1.0 / 3)]:
        cdf = torch.distributions.Normal(0.0, scale).cdf(torch.tensor([-0.5, 0.5], dtype=torch.float64))
        expected = ((cumulative[4:6] - cdf) ** 2).mean()
        torch.testing.assert_close(near_surface_loss(weights, samples, target, 1.0, 1, quirk), expected)
    assert float(empty_space_loss(weights, samples, torch.zeros(1, dtype=torch.float64), 1.0)) == 0.0  # no target
    depth = torch.tensor([4.0, 7.0])
    assert float(depth_loss(depth, torch.tensor([5.0, 0.0]))) == 1.0  # second ray has no depth


def test_loss_dict_weights_and_eps_schedule():
    samples, weights = _random_samples([5, 5])
    outputs = {"rgb": torch.full((2, 3), 0.5), "alpha": torch.tensor([0.5, 0.5]), "depth": torch.tensor([2.0, 2.0]),
               "weights": weights, "samples": samples}
    config = LossConfig()
    losses = nersemble_losses(outputs, torch.ones(2, 3), torch.tensor([1.0, 0.2]), torch.tensor([2.5, 0.0]), config, 0)
    assert set(losses) == {"rgb", "alpha", "empty", "near", "depth", "distortion"}
    torch.testing.assert_close(losses["alpha"], torch.tensor(1e-2 * 0.3))
    torch.testing.assert_close(losses["depth"], torch.tensor(1e-4 * 0.25))
    torch.testing.assert_close(losses["distortion"], 1e-4 * distortion_loss(weights, samples))
    late = nersemble_losses(outputs, torch.ones(2, 3), None, None, config, 20000)
    assert set(late) == {"rgb", "distortion"}
