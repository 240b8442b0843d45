"""The fast no-grad path's pieces against their torch twins: the lean deformation MLP (split weights, code
biases) against ``screw_axis``, and the C front-to-back visibility pass against the torch slab loop, in
training (alpha culling, per-ray timesteps, density only) and rendering (colour and offset of kept samples)."""

from __future__ import annotations

import pytest
import torch

from stages.nersemble import nograd
from stages.nersemble.kernels.cpu import build as fast
from stages.nersemble.deformation import windowed_posenc
from stages.nersemble.sampling import march_rays

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fast_kernels")


@pytest.mark.parametrize("step", [0, 300, None])
def test_lean_deformation_equals_screw_axis(step, scaled_preview_model):
    """Posenc in C (its own vectorised sine) and the split-weight MLP against the eager screw axis."""
    model = scaled_preview_model(1.0)
    gen = torch.Generator().manual_seed(1)
    positions = torch.rand(500, 3, generator=gen) * 2.0 - 1.0
    t = torch.randint(0, 3, (500,), generator=gen)
    alpha = model.windows(step).deformation
    box = model.scene_box
    x_n = (positions - box[0]) / (box[1] - box[0])
    lean = nograd.NoGradDeformation(model.deformation, model.codes.deformation.weight, box)
    with torch.no_grad():
        v, r = model.deformation.screw_axis(x_n, model.codes.deformation(t), alpha)
        screw = lean(positions, t, alpha)
    c = model.config.deformation
    torch.testing.assert_close(lean.posenc(positions, alpha), windowed_posenc(x_n, c.n_frequencies, alpha),
                               rtol=0.0, atol=3e-7)  # sines within ~1 ulp of torch's
    # The same products summed in another order: float32 rounding of the largest terms.
    torch.testing.assert_close(screw, torch.cat([v, r], dim=-1), rtol=1e-5, atol=1e-6 * float(screw.abs().max()))


def _rays(n: int = 300):
    gen = torch.Generator().manual_seed(2)
    o = torch.randn(n, 3, generator=gen) * 0.2 + torch.tensor([0.0, 0.0, -3.0])
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen) * 0.2 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    return o, d, torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("training", [True, False])
def test_front_to_back_keeps_the_reference_samples(training, monkeypatch, scaled_preview_model):
    model = scaled_preview_model(1.0, **{"sampler.step_size": 0.02})
    with torch.no_grad():  # raw densities of +-several: opaque patches that stop rays, and empty space
        model.field.encoding.table.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(4))
        model.codes.blend.weight.fill_(1.0)
        model.field.density_mlp[-1].weight[0] *= 1.0
    model.train(training)
    o, d, t = _rays()
    windows = model.windows(1500 if training else None)
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv(fast.ENV, flag)
        with torch.no_grad():
            runs.append(model.sample(o, d, t, windows, generator=torch.Generator().manual_seed(3)))
    (fast_samples, fast_values), (ref_samples, ref_values) = runs
    assert torch.equal(fast_samples.ray_indices, ref_samples.ray_indices)
    assert torch.equal(fast_samples.t_starts, ref_samples.t_starts)
    # Early termination cut rays short (a test that could not see a wrong stopping rule otherwise): their last
    # kept sample lies well before their last marched one.
    every = march_rays(o, d, model.scene_box, 0.02, model.config.sampler.near_plane,
                       occupied=model.occupancy.occupied())
    ends = torch.zeros(o.shape[0]).index_reduce_(0, ref_samples.ray_indices, ref_samples.t_ends, "amax",
                                                  include_self=False)
    last = torch.zeros(o.shape[0]).index_reduce_(0, every.ray_indices, every.t_ends, "amax", include_self=False)
    assert 0 < len(ref_samples) and int((ends < last - 0.5).sum()) > 10
    if training:
        assert fast_values is None and ref_values is None
    else:
        # This field's table varies over a cell (~0.004 units) by O(1): the warp's float32 rounding (~1e-7)
        # moves features by ~1e-4, which exp and the MLPs carry into sigma and colour.
        for name in ("sigma", "rgb", "offset"):
            a, b = getattr(fast_values, name), getattr(ref_values, name)
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 if name == "rgb" else 1e-6, msg=name)
