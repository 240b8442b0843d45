"""Ray-box intersection, ray marching and volume rendering of packed samples, against analytic answers."""

from __future__ import annotations

import math

import torch

from stages.nersemble.packed import segment_cumsum
from stages.nersemble.rendering import composite, render_weights
from stages.nersemble.sampling import march_rays, ray_aabb_intersect

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], dtype=torch.float64)


def test_ray_aabb_intersect():
    o = torch.tensor([[0.0, 0.0, -5.0], [0.0, 0.0, 0.0], [3.0, 0.0, -5.0], [-5.0, 0.5, 0.5]], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    t_near, t_far = ray_aabb_intersect(o, d, BOX)
    assert t_near.tolist()[:2] == [4.0, -1.0] and t_far.tolist()[:2] == [6.0, 1.0]
    assert t_far[2] < t_near[2]  # parallel to the z slabs, outside the x slab: a miss
    assert (t_near[3], t_far[3]) == (4.0, 6.0)


def test_march_uniform_steps_inside_the_box():
    o = torch.tensor([[0.0, 0.0, -5.0], [0.3, -0.2, -5.0], [5.0, 5.0, -5.0]], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    samples = march_rays(o, d, BOX, step_size=0.1, near_plane=0.0)
    assert samples.ray_indices.tolist() == [0] * 20 + [1] * 20  # the third ray misses
    torch.testing.assert_close(samples.t_mids[:20], 4.05 + 0.1 * torch.arange(20, dtype=torch.float64))
    torch.testing.assert_close(samples.deltas, torch.full((40,), 0.1, dtype=torch.float64))
    # Near plane inside the box: marching starts there.
    inside = march_rays(o[:1], d[:1], BOX, step_size=0.1, near_plane=5.5)
    assert len(inside) == 5 and abs(float(inside.t_starts[0]) - 5.5) < 1e-9


def test_march_skips_empty_cells_and_jitters():
    occupied = torch.zeros(4, 4, 4, dtype=torch.bool)
    occupied[:, :, 2:] = True  # only z > 0 is occupied
    o = torch.tensor([[0.1, 0.1, -5.0]], dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    samples = march_rays(o, d, BOX, step_size=0.1, occupied=occupied)
    mids_z = (o[0, 2] + samples.t_mids)
    assert len(samples) == 10 and (mids_z > 0).all()
    torch.manual_seed(0)
    jittered = march_rays(o.expand(200, 3), d.expand(200, 3), BOX, step_size=0.1, stratified=True)
    counts = torch.bincount(jittered.ray_indices, minlength=200)
    assert counts.min() >= 19 and counts.max() <= 21
    first = jittered.t_starts[torch.cumsum(counts, 0) - counts]
    offset = torch.remainder(first, 0.1)
    assert offset.min() >= 0 and offset.max() < 0.1 and offset.std() > 0.02  # U(0, step) phase


def test_slab_transmittance_is_analytic():
    # One ray crossing a slab of constant density sigma between t = 1 and t = 2 in 50 steps.
    sigma, n = 3.0, 50
    t_starts = torch.linspace(1.0, 2.0, n + 1, dtype=torch.float64)[:-1]
    t_ends = t_starts + 1.0 / n
    ray_indices = torch.zeros(n, dtype=torch.long)
    weights, transmittance, alphas = render_weights(torch.full((n,), sigma, dtype=torch.float64), t_starts, t_ends,
                                                    ray_indices, 1)
    torch.testing.assert_close(transmittance, torch.exp(-sigma * (t_starts - 1.0)))
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0 - math.exp(-sigma), dtype=torch.float64))
    red = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(n, 3)
    out = composite(weights, red, 0.5 * (t_starts + t_ends), ray_indices, 1)
    acc = 1.0 - math.exp(-sigma)
    torch.testing.assert_close(out.rgb[0], torch.tensor([1.0, 1.0 - acc, 1.0 - acc], dtype=torch.float64))
    # Expected depth of an exponential truncated to the slab (continuous limit, step 0.02).
    expected = 1.0 + 1.0 / sigma - math.exp(-sigma) / acc
    assert abs(float(out.depth[0]) - expected) < 1e-3


def test_packed_rays_are_independent():
    sig = torch.tensor([1.0, 2.0, 0.5, 0.5, 4.0], dtype=torch.float64)
    t0 = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.4], dtype=torch.float64)
    ray = torch.tensor([0, 0, 2, 2, 2])
    w, _, _ = render_weights(sig, t0, t0 + 0.1, ray, 3)
    w0, _, _ = render_weights(sig[:2], t0[:2], t0[:2] + 0.1, ray[:2] * 0, 1)
    w2, _, _ = render_weights(sig[2:], t0[2:], t0[2:] + 0.1, ray[2:] * 0, 1)
    torch.testing.assert_close(w, torch.cat([w0, w2]))
    out = composite(w, torch.zeros(5, 3, dtype=torch.float64), t0 + 0.05, ray, 3)
    assert out.accumulation[1] == 0 and torch.equal(out.rgb[1], torch.ones(3, dtype=torch.float64))


def test_segment_cumsum_matches_a_loop():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 4])
    ray = torch.repeat_interleave(torch.arange(6), counts)
    v = torch.rand(int(counts.sum())) * 1000.0
    inclusive = segment_cumsum(v, ray, 6)
    exclusive = segment_cumsum(v, ray, 6, exclusive=True)
    start = 0
    for c in counts.tolist():
        seg = v[start:start + c]
        torch.testing.assert_close(inclusive[start:start + c], torch.cumsum(seg, 0))
        torch.testing.assert_close(exclusive[start:start + c], torch.cumsum(seg, 0) - seg)
        start += c
