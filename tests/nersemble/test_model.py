"""NeRSembleModel end to end: outputs, parameter groups, chunked rendering, and a small overfitting run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.core.cameras import look_at
from stages.nersemble.config import preset
from stages.nersemble.losses import nersemble_losses
from stages.nersemble.model import NeRSembleModel, timestep_index
from stages.nersemble.optim import build_lr_scheduler, build_optimizer, denormals_flushed
from stages.nersemble.rays import Rays, camera_rays, pixel_centers, scene_box_from_cameras

RADIUS = 0.12  # metres: the synthetic sphere
SIZE = 32  # pixels per side of the synthetic views


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _eye(i: int, n: int = 6) -> list[float]:
    """Camera i of a ring 1 m from the origin, alternating 0.3 m above and below."""
    angle = 2 * math.pi * i / n
    return [math.sin(angle), 0.3 * (-1) ** i, math.cos(angle)]


def _rig(n: int = 6) -> list[tuple[np.ndarray, np.ndarray]]:
    """(K, world_2_cam) of the ring cameras, all looking at the origin."""
    K = np.array([[80.0, 0.0, SIZE / 2], [0.0, 80.0, SIZE / 2], [0.0, 0.0, 1.0]])
    return [(K, look_at(np.array(_eye(i, n)), np.zeros(3))) for i in range(n)]


def _sphere_truth(rays: Rays, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic render of a sphere coloured by its normal on white: rgb, alpha, ray distance (model units)."""
    o, d = rays.origins.double() / scale, rays.directions.double()
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - RADIUS**2)
    hit = disc > 0
    t = -b - torch.sqrt(disc.clamp(min=0))
    normal = torch.nn.functional.normalize(o + d * t[:, None], dim=-1)
    rgb = torch.where(hit[:, None], 0.5 + 0.45 * normal, torch.ones_like(normal))
    return rgb.float(), hit.float(), torch.where(hit, t * scale, torch.zeros_like(t)).float()


def _small_model(n_timesteps: int = 2, box_size: float = 0.32, **overrides) -> NeRSembleModel:
    torch.manual_seed(0)
    config = preset("preview").with_overrides(**overrides)
    box = scene_box_from_cameras([w for _, w in _rig()], (box_size,) * 3, config.scene.world_scale)
    return NeRSembleModel(config, n_timesteps, box, backend="torch")


def test_forward_outputs():
    model = _small_model(step_size=0.1).train()
    K, w2c = _rig()[0]
    rays = camera_rays(K, w2c, pixel_centers(SIZE, SIZE)[::7], model.config.scene.world_scale)
    n = rays.origins.shape[0]
    out = model(rays.origins, rays.directions, torch.arange(n) % 2, step=0)
    assert out["rgb"].shape == (n, 3) and out["alpha"].shape == (n,) and out["depth"].shape == (n,)
    assert out["deformation"].shape == (n, 3)
    samples, weights = out["samples"], out["weights"]
    assert len(samples) == weights.shape[0] > 0
    assert (torch.diff(samples.ray_indices) >= 0).all()  # packed: grouped by ray
    assert (weights >= 0).all() and (out["alpha"] <= 1 + 1e-6).all()
    assert torch.isfinite(out["rgb"]).all() and out["rgb"].requires_grad


def test_param_groups_and_step_lr():
    model = _small_model(lr_step_size=3)
    groups = model.param_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [("fields", 5e-3), ("deformation_field", 1e-3),
                                                      ("embeddings", 5e-3)]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    optimizer = build_optimizer(model)
    assert optimizer.defaults["eps"] == 1e-15
    scheduler = build_lr_scheduler(optimizer, model.config)
    step_size = model.config.optim.lr_step_size
    for _ in range(2 * step_size):
        optimizer.step()
        scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([5e-3 * 0.8**2, 1e-3 * 0.5**2, 5e-3 * 0.8**2])
    scheduler.step()
    assert optimizer.param_groups[1]["lr"] == pytest.approx(1e-3 * 0.5**2)  # constant within a period


def test_fast_path_adam_is_fused_and_takes_the_plain_adams_steps(monkeypatch):
    """The CPU fast path fuses Adam's passes over the tables; the update is the same up to float rounding, and
    a state saved by either path resumes under the path now in use."""
    from stages.nersemble.kernels.cpu import build as fast
    from stages.nersemble.optim import choose_fused

    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(fast.ENV, flag)
        torch.manual_seed(0)
        model = _small_model()
        optimizer = build_optimizer(model)
        assert all(g["fused"] is (True if flag == "1" else None) for g in optimizer.param_groups)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for param in model.parameters():
                param.grad = torch.randn(param.shape, generator=gen) * (torch.rand(param.shape, generator=gen) > 0.7)
            optimizer.step()
        runs[flag] = ([p.detach().clone() for p in model.parameters()], optimizer.state_dict())
    for plain, fused in zip(runs["0"][0], runs["1"][0], strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-7)
    monkeypatch.setenv(fast.ENV, "0")
    optimizer.load_state_dict(runs["1"][1])  # a fast-path checkpoint resumed on the reference path
    assert all(g["fused"] for g in optimizer.param_groups)  # the saving run's choice came back with it
    assert all(g["fused"] is None for g in choose_fused(optimizer).param_groups)


def test_denormals_are_flushed_inside_the_block_only():
    tiny = torch.full((64,), 1e-39)  # below float32's smallest normal
    with denormals_flushed():
        inside = tiny * 1.0
    after = tiny * 1.0
    if torch.set_flush_denormal(False):  # the default mode; True where the CPU has a flush-to-zero mode
        assert torch.all(inside == 0)
    assert torch.all(after == tiny)  # the caller's arithmetic is left as it was


def test_occupancy_updates_on_schedule_and_frustum_mask():
    model = _small_model(step_size=0.1, box_size=0.8)  # larger than the views: its corners are unseen
    rig = _rig()
    model.set_training_cameras([K for K, _ in rig], [w for _, w in rig], [(SIZE, SIZE)] * len(rig))
    assert model.occupancy.visible.any() and not model.occupancy.visible.all()  # box corners are unseen
    assert model.update_occupancy(0) and not model.update_occupancy(1)
    assert model.occupancy.occs.max() > 0


def test_render_image_is_chunk_invariant():
    model = _small_model(step_size=0.1)
    K, w2c = _rig()[1]
    a = model.render_image(K, w2c, 12, 10, timestep=1, chunk=37)
    b = model.render_image(K, w2c, 12, 10, timestep=1, chunk=4096)
    assert a["rgb"].shape == (10, 12, 3) and a["alpha"].shape == (10, 12) and a["z_depth"].shape == (10, 12)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert ((a["rgb"] >= 0) & (a["rgb"] <= 1)).all()
    hit = a["alpha"] > 0.5
    assert hit.any() and (a["z_depth"][hit] <= a["depth"][hit] + 1e-6).all()
    assert 0.5 < float(a["depth"][hit].mean()) < 1.5  # metres: the box sits 1 m in front of the camera


def test_early_termination_drops_only_samples_behind_an_opaque_surface():
    model = _small_model(step_size=0.05, early_stop_eps=0.0)
    with torch.no_grad():  # a dense fog: every ray turns opaque within the box
        for table in model.field.encoding.parameters():
            table.fill_(0.5)
        model.codes.blend.weight.fill_(1.0)
        for layer in model.field.density_mlp:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.abs_()
        model.field.density_mlp[-1].weight[0].fill_(0.01)  # density ~17 per model unit
    K, w2c = _rig()[1]
    rays = camera_rays(K, w2c, pixel_centers(SIZE, SIZE), model.config.scene.world_scale)
    model.eval()
    with torch.no_grad():
        full = model(rays.origins, rays.directions, 0)
        model.config = model.config.with_overrides(early_stop_eps=1e-3)
        culled = model(rays.origins, rays.directions, 0)
    assert len(culled["samples"]) < 0.8 * len(full["samples"])
    assert float(full["alpha"].max()) > 0.999
    torch.testing.assert_close(culled["rgb"], full["rgb"], atol=2e-3, rtol=0)
    torch.testing.assert_close(culled["alpha"], full["alpha"], atol=1e-3, rtol=0)


def test_rendering_marches_finer_than_training_by_eval_substeps():
    model = _small_model(step_size=0.1, early_stop_eps=0.0, eval_substeps=2, alpha_threshold=0.0)
    K, w2c = _rig()[1]
    rays = camera_rays(K, w2c, pixel_centers(SIZE, SIZE)[::5], model.config.scene.world_scale)
    with torch.no_grad():
        trained = model.train()(rays.origins, rays.directions, 0)["samples"]
        rendered = model.eval()(rays.origins, rays.directions, 0)["samples"]
    torch.testing.assert_close(trained.deltas, torch.full_like(trained.deltas, 0.1))
    torch.testing.assert_close(rendered.deltas, torch.full_like(rendered.deltas, 0.05))
    assert abs(len(rendered) / len(trained) - 2.0) < 0.05
    with pytest.raises(ValueError, match="eval_substeps"):
        model.config.with_overrides(eval_substeps=0)


def test_restricting_occupancy_removes_samples_outside_the_mask():
    model = _small_model(step_size=0.1)
    K, w2c = _rig()[1]
    rays = camera_rays(K, w2c, pixel_centers(SIZE, SIZE), model.config.scene.world_scale)
    model.eval()
    before = len(model(rays.origins, rays.directions, 0)["samples"])
    r = model.config.occupancy.resolution
    mask = torch.zeros(r, r, r, dtype=torch.bool)
    mask[r // 4: 3 * r // 4, r // 4: 3 * r // 4, r // 4: 3 * r // 4] = True
    model.restrict_occupancy(mask)
    out = model(rays.origins, rays.directions, 0)
    assert 0 < len(out["samples"]) < before
    positions = out["samples"].positions(rays.origins, rays.directions)
    assert bool(model.occupancy.lookup(positions).all())


def test_rays_and_scene_box():
    rig = _rig()
    box = scene_box_from_cameras([w for _, w in rig], (0.3, 0.3, 0.3), world_scale=9.0)
    torch.testing.assert_close(box, torch.tensor([[-1.35] * 3, [1.35] * 3]), atol=1e-5, rtol=0)
    K, w2c = rig[0]
    rays = camera_rays(K, w2c, torch.tensor([[SIZE / 2, SIZE / 2]]), world_scale=9.0)
    torch.testing.assert_close(rays.origins[0], torch.tensor(_eye(0), dtype=torch.float32) * 9.0)
    torch.testing.assert_close(rays.directions[0], -torch.nn.functional.normalize(rays.origins[0], dim=0))
    assert float(rays.z_dirs[0]) == pytest.approx(1.0)
    assert int(timestep_index(1.0, 24)) == 23 and int(timestep_index(0.5, 24)) == 12  # round(11.5) = 12


def test_overfits_a_synthetic_sphere():
    steps, n_rays = 150, 128
    model = _small_model(
        steps=steps, rays_per_batch=n_rays, step_size=0.08,
        # The whole warm-up within the run: PE annealing, single-grid phase, fade-in of the other grids.
        deformation__window=(0, 7, 0, steps // 4), hash__window=(1, 4, steps // 4, steps // 2),
        # Official masked RGB loss; a stronger alpha loss clears the background within the short run.
        lr_step_size=steps, lambda_alpha=1.0,
    )
    config, scale = model.config, model.config.scene.world_scale
    rig = _rig()
    model.set_training_cameras([K for K, _ in rig], [w for _, w in rig], [(SIZE, SIZE)] * len(rig))
    views = [camera_rays(K, w, pixel_centers(SIZE, SIZE), scale) for K, w in rig]
    rays = Rays(*(torch.cat([getattr(v, f) for v in views]) for f in ("origins", "directions", "z_dirs")))
    rgb, alpha, depth = _sphere_truth(rays, scale)
    optimizer = build_optimizer(model)
    scheduler = build_lr_scheduler(optimizer, config)
    generator = torch.Generator().manual_seed(0)
    history = []
    model.train()
    for step in range(steps):
        model.update_occupancy(step, generator)
        idx = torch.randint(0, rgb.shape[0], (n_rays,), generator=generator)
        timesteps = torch.randint(0, 2, (n_rays,), generator=generator)
        out = model(rays.origins[idx], rays.directions[idx], timesteps, step=step, generator=generator)
        losses = nersemble_losses(out, rgb[idx], alpha[idx], depth[idx], config.loss, step)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        history.append(float(total.detach()))
    assert np.mean(history[-20:]) < 0.25 * np.mean(history[:20])

    K, w2c = rig[1]
    image = model.render_image(K, w2c, SIZE, SIZE, timestep=0)["rgb"]
    truth = rgb[SIZE * SIZE:2 * SIZE * SIZE].view(SIZE, SIZE, 3)
    psnr = -10 * math.log10(float(((image - truth) ** 2).mean()))
    constant = -10 * math.log10(float(((truth.mean((0, 1)) - truth) ** 2).mean()))
    assert psnr > constant + 4.0, (psnr, constant)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_precision_forward_on_cuda():
    model = _small_model(step_size=0.1).cuda().train()
    K, w2c = _rig()[0]
    rays = camera_rays(K, w2c, pixel_centers(SIZE, SIZE).cuda(), model.config.scene.world_scale)
    out = model(rays.origins, rays.directions, 0, step=0)
    assert out["rgb"].dtype == torch.float32 and torch.isfinite(out["rgb"]).all()
    sum(nersemble_losses(out, torch.ones_like(out["rgb"]), None, None, model.config.loss, 0).values()).backward()
