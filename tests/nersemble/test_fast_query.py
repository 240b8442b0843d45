"""The fused no-grad query (deformation, hash ensemble, density and colour MLPs in one C pass) against the
eager model, which is its torch twin: density, colour and offset, in training-time and final windows, with
the deformation on and off; and whole renders through both paths."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from stages.core.cameras import look_at
from stages.nersemble import nograd
from stages.nersemble.kernels.cpu import build as fast
from stages.nersemble.model import NeRSembleModel
from stages.nersemble.rays import scene_box_from_cameras

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fast_kernels")


def _inputs(n: int = 400):
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(n, 3, generator=gen) * 4.4 - 2.2  # some samples outside the box
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    t = torch.randint(0, 3, (n,), generator=gen)
    return p, d, t


def _twin(model, p, d, t, windows, monkeypatch):
    with torch.no_grad():
        fused = model.query(p, d, t, windows)
        fused_density = model.density(p, t, windows)
        monkeypatch.setenv(fast.ENV, "0")
        twin = model.query(p, d, t, windows)
        twin_density = model.density(p, t, windows)
        monkeypatch.delenv(fast.ENV)
    return fused, twin, fused_density, twin_density


@pytest.mark.parametrize("step", [0, 1500, None])
@pytest.mark.parametrize("deformation", [True, False])
def test_fused_query_matches_the_eager_model(step, deformation, monkeypatch, scaled_preview_model):
    model = scaled_preview_model(2.0, **({} if deformation else {"deformation.enabled": False}))
    assert nograd.query_supported(model)
    p, d, t = _inputs()
    fused, twin, fused_density, twin_density = _twin(model, p, d, t, model.windows(step), monkeypatch)
    for a, b, name in zip(fused, twin, ("sigma", "rgb", "offset"), strict=True):
        # The offset is warped - x_n with x_n ~ 0.5: both paths cancel to the same float32 ulp of x_n (6e-8).
        atol = 1e-6 if name == "offset" else 1e-5 * float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=name)
    torch.testing.assert_close(fused_density, twin_density, rtol=1e-4, atol=1e-5 * float(twin_density.abs().max()))
    assert bool((fused[0] > 0).any()) and bool((fused[0] == 0).any())  # both inside and outside the box


def test_fused_query_follows_every_change_of_the_weights(monkeypatch, scaled_preview_model):
    """The fast query's copies of the MLPs must never go stale: after an optimiser step (torch's fused Adam
    updates parameters without moving their version counters), a loaded state dict, an in-place edit, or a
    render (which holds one set of copies while it runs), the next query sees the current weights."""
    from stages.nersemble.optim import build_optimizer

    model = scaled_preview_model(2.0)
    other = scaled_preview_model(2.0)
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(0.7)
    p, d, t = _inputs()
    windows = model.windows(None)
    K = torch.tensor([[20.0, 0.0, 8.0], [0.0, 20.0, 8.0], [0.0, 0.0, 1.0]])
    w2c = torch.eye(4)
    w2c[2, 3] = 6.0

    def step(optimizer: torch.optim.Optimizer) -> None:
        for param in model.parameters():
            param.grad = torch.ones_like(param)
        optimizer.step()

    def hand_edit() -> None:
        with torch.no_grad():
            model.deformation.layers[1].weight.mul_(1.5)
            model.field.color_mlp[0].weight.mul_(1.5)

    adam = build_optimizer(model)
    assert all(g["fused"] for g in adam.param_groups)
    changes = (lambda: step(adam), lambda: step(torch.optim.SGD(model.parameters(), lr=10.0)),
               lambda: model.load_state_dict(other.state_dict()), hand_edit)
    for change in changes:
        with torch.no_grad():
            before = model.query(p, d, t, windows)
            model.render_image(K, w2c, 16, 16, 0)
        change()
        fused, twin, _, _ = _twin(model, p, d, t, windows, monkeypatch)
        assert not torch.allclose(fused[1], before[1])
        torch.testing.assert_close(fused[1], twin[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused[0], twin[0], rtol=1e-4, atol=1e-5 * float(twin[0].abs().max()))


def _unpadded_copy(model: NeRSembleModel) -> NeRSembleModel:
    """``model`` with the colour MLP's first layer cut to its 18 real inputs: a field from before the padding."""
    old = copy.deepcopy(model)
    first = model.field.color_mlp[0]
    n_real = 3 + model.config.field.geo_feat_dim
    narrow = torch.nn.Linear(n_real, first.out_features, bias=first.bias is not None)
    with torch.no_grad():
        narrow.weight.copy_(first.weight[:, :n_real])
    old.field.color_mlp[0] = narrow
    return old


def test_padded_colour_inputs_are_ones(monkeypatch, scaled_preview_model):
    """The preset's colour MLP takes 32 inputs, 14 of them constant ones: its first-layer bias."""
    model = scaled_preview_model(2.0)
    assert model.field.color_mlp[0].in_features == 32
    p, d, t = _inputs()
    windows = model.windows(None)
    fused, twin, _, _ = _twin(model, p, d, t, windows, monkeypatch)
    torch.testing.assert_close(fused[1], twin[1], rtol=1e-4, atol=1e-5)
    # Without the ones the colours differ: the test above can see a kernel that drops the padding.
    with torch.no_grad():
        unpadded = _unpadded_copy(model).query(p, d, t, windows)[1]
    assert float((fused[1] - unpadded).abs().max()) > 1e-2


@pytest.mark.parametrize("how", ["unpadded field", "old checkpoint loaded"])
def test_fused_query_matches_an_unpadded_colour_mlp(how, monkeypatch, scaled_preview_model):
    """Fields from before the padding: an 18-wide first layer, or its checkpoint loaded into a padded field."""
    old = _unpadded_copy(scaled_preview_model(2.0))
    assert old.field.color_mlp[0].in_features == 18
    if how == "old checkpoint loaded":
        model = scaled_preview_model(2.0)
        model.load_state_dict(old.state_dict())  # the field pads the 18 columns with zero weights
        assert model.field.color_mlp[0].in_features == 32
    else:
        model = old
    assert nograd.query_supported(model)
    p, d, t = _inputs()
    windows = model.windows(None)
    fused, twin, _, _ = _twin(model, p, d, t, windows, monkeypatch)
    for a, b, name in zip(fused, twin, ("sigma", "rgb", "offset"), strict=True):
        atol = 1e-6 if name == "offset" else 1e-5 * float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=name)
    monkeypatch.setenv(fast.ENV, "0")
    with torch.no_grad():
        reference = old.query(p, d, t, windows)[1]  # what the old field computed, eagerly
    torch.testing.assert_close(fused[1], reference, rtol=1e-4, atol=1e-5)


def test_grad_mode_keeps_the_autograd_path(scaled_preview_model):
    model = scaled_preview_model(2.0)
    p, d, t = _inputs(50)
    sigma, rgb, _ = model.query(p, d, t, model.windows(None))
    assert sigma.requires_grad and rgb.requires_grad


def test_render_image_matches_the_reference_render(monkeypatch, scaled_preview_model):
    model = scaled_preview_model(2.0, step_size=0.2)
    K = np.array([[40.0, 0.0, 12.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]])
    w2c = look_at(np.array([0.0, 0.0, 1.0]), np.zeros(3))
    fused = model.render_image(K, w2c, 24, 32, 1)
    monkeypatch.setenv(fast.ENV, "0")
    twin = model.render_image(K, w2c, 24, 32, 1)
    for key in ("rgb", "alpha", "depth"):
        torch.testing.assert_close(fused[key], twin[key], rtol=1e-3, atol=1e-4, msg=key)


def test_slab_ids_equal_the_masked_selection():
    from stages.nersemble.model import _slab_ids

    gen = torch.Generator().manual_seed(2)
    counts = torch.randint(0, 40, (60,), generator=gen)
    alive = torch.rand(60, generator=gen) > 0.3
    ray_ids = torch.repeat_interleave(torch.arange(60), counts)
    first = torch.cumsum(counts, 0) - counts
    index_in_ray = torch.arange(ray_ids.shape[0]) - first[ray_ids]
    for start in range(0, 40, 16):
        masked = torch.nonzero((index_in_ray >= start) & (index_in_ray < start + 16) & alive[ray_ids])[:, 0]
        assert torch.equal(_slab_ids(first, counts, alive, start, 16), masked)


def _assert_marching_matches_the_twin(o, d, aabb, step, occupied, stratified, monkeypatch, min_samples):
    """The C marcher and the torch one keep the same samples, bit for bit."""
    from stages.nersemble.sampling import march_rays

    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv(fast.ENV, flag)
        runs.append(march_rays(o, d, aabb, step, 0.2, 100.0, occupied=occupied, stratified=stratified,
                               generator=torch.Generator().manual_seed(5)))
    fused, twin = runs
    assert len(twin) > min_samples
    assert torch.equal(fused.ray_indices, twin.ray_indices)
    assert torch.equal(fused.t_starts, twin.t_starts) and torch.equal(fused.t_ends, twin.t_ends)


@pytest.mark.parametrize("stratified", [False, True])
def test_fused_marching_of_a_sparse_grid_keeps_exactly_the_torch_samples(stratified, monkeypatch):
    """A head-like grid: one occupied blob and a few stray cells in mostly empty space, so the second pass walks
    short spans; rays from every side (some along an axis, some grazing the box, some missing everything)."""
    gen = torch.Generator().manual_seed(6)
    aabb = torch.tensor([[-1.0, -1.2, -0.8], [1.0, 1.1, 1.3]])
    occupied = torch.zeros(37, 20, 29, dtype=torch.bool)
    occupied[12:25, 6:15, 9:21] = torch.rand(13, 9, 12, generator=gen) > 0.3
    occupied[torch.randint(0, 37, (12,), generator=gen), torch.randint(0, 20, (12,), generator=gen),
             torch.randint(0, 29, (12,), generator=gen)] = True
    occupied[36, 19, 28] = occupied[0, 0, 0] = True  # corner cells
    occupied[8, 2:5, 3:6] = occupied[31, 16:19, 23:26] = True  # lone cells, met from either side
    d = torch.nn.functional.normalize(torch.randn(600, 3, generator=gen), dim=-1)
    o = -3.0 * d + torch.randn(600, 3, generator=gen) * 0.6
    d[:3], o[:3] = torch.eye(3), torch.tensor([[-4.0, 0.1, 0.2], [0.3, -4.0, 0.1], [0.2, 0.2, -4.0]])
    # along x through those cells, both ways, and diagonally
    d[3:7] = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0], [1.0, 0.02, 0.01],
                                                         [-1.0, 0.01, -0.02]]), dim=-1)
    o[3:7] = torch.tensor([[-3.0, -0.8, -0.47], [3.0, -0.8, -0.47], [-3.0, 0.78, 0.95], [3.0, 0.83, 1.0]])
    _assert_marching_matches_the_twin(o, d, aabb, 0.013, occupied, stratified, monkeypatch, min_samples=500)


@pytest.mark.parametrize("stratified", [False, True])
def test_fused_marching_equals_the_torch_marching(stratified, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    aabb = torch.tensor([[-1.0, -1.5, -1.0], [1.0, 1.0, 2.0]])
    o = torch.randn(300, 3, generator=gen) * 0.5 + torch.tensor([0.0, 0.0, -4.0])
    d = torch.nn.functional.normalize(torch.randn(300, 3, generator=gen) * 0.3 + torch.tensor([0.0, 0.0, 1.0]), dim=-1)
    d[0] = torch.tensor([0.0, 0.0, 1.0])  # axis-parallel: inf/nan slabs
    occupied = torch.rand(8, 8, 8, generator=gen) > 0.5
    _assert_marching_matches_the_twin(o, d, aabb, 0.05, occupied, stratified, monkeypatch, min_samples=1000)
