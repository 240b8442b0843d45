"""Config presets hold the official hyper-parameters; overrides and schedules behave as documented."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stages.nersemble.config import NeRSembleConfig, preset
from stages.nersemble.schedules import Schedule, cosine_window


def test_paper_preset_is_the_official_setting():
    c = preset("paper")
    assert c == NeRSembleConfig()
    assert (c.hash.n_grids, c.hash.n_levels, c.hash.features_per_level, c.hash.log2_table_size) == (32, 16, 2, 19)
    assert c.hash.base_resolution == 16 and math.isclose(c.hash.per_level_scale, 256 ** (1 / 15), rel_tol=1e-7)
    assert c.hash.window == Schedule(1, 32, 40000, 80000) and c.hash.disable_initial_ensemble and c.hash.soft_transition
    assert c.codes.deformation_dim == 128 and c.codes.init_scale == 0.01
    d = c.deformation
    assert (d.n_frequencies, d.num_layers, d.layer_width, d.skip_connections) == (7, 6, 128, (4,))
    assert d.window == Schedule(0, 7, 0, 20000) and d.head_init == 1e-5 and d.offset_units == "paper"
    f = c.field
    assert (f.hidden_dim, f.num_layers, f.geo_feat_dim, f.hidden_dim_color, f.num_layers_color) == (64, 2, 15, 64, 3)
    assert not f.use_bias and f.background_color == (1.0, 1.0, 1.0)
    o = c.occupancy
    assert (o.resolution, o.occ_threshold, o.ema_decay, o.update_every, o.warmup_steps, o.frustum_min_cameras) == (
        128, 0.01, 0.95, 16, 256, 2)
    s = c.sampler
    assert (s.step_size, s.near_plane, s.far_plane, s.alpha_threshold, s.early_stop_eps) == (0.011, 0.2, 1000, 0.01, 0)
    loss = c.loss
    assert (loss.lambda_alpha, loss.lambda_empty, loss.lambda_near, loss.lambda_depth, loss.lambda_distortion) == (
        1e-2, 1e-2, 1e-4, 1e-4, 1e-4)
    assert loss.depth_eps == Schedule(0.9, 0.01, 0, 10000) and loss.alpha_mask_threshold == 0.0
    opt = c.optim
    assert (opt.lr_fields, opt.lr_deformation, opt.lr_embeddings, opt.adam_eps) == (5e-3, 1e-3, 5e-3, 1e-15)
    assert (opt.lr_step_size, opt.gamma_fields, opt.gamma_deformation, opt.gamma_embeddings) == (20000, 0.8, 0.5, 0.8)
    t = c.train
    assert (t.steps, t.rays_per_batch, t.seed, t.mixed_precision) == (300001, 4096, 19980801, True)
    assert t.target_samples_per_batch == 0  # upstream's batches are fixed
    assert c.scene.world_scale == 9.0
    assert (c.eval.chunk, c.eval.max_eval_timesteps, c.eval.filter_threshold, c.eval.filter_sigma_erosion) == (
        8192, 15, 0.05, 7.0)
    assert c.data.downscale_factor == 2 and c.data.depth_range_m == (0.8, 1.4)


def test_preview_is_small_and_keeps_schedule_proportions():
    c = preset("preview")
    assert c.hash.n_grids == 4 and c.hash.log2_table_size == 14 and 8 <= c.hash.n_levels <= 12
    assert c.train.rays_per_batch == 1024 and c.train.steps == 3000 and c.deformation.layer_width == 32
    assert c.hash.window == Schedule(1, 4, 400, 800)
    assert c.deformation.window.end == 200 and c.loss.depth_eps.end == 100
    # CPU-budget deviations (documented in the preset): slower lr decay, fog cleared fast, culling behind T < 1e-3.
    assert c.optim.lr_step_size == 600 and c.loss.lambda_alpha == 1.0 and c.sampler.early_stop_eps == 1e-3
    assert c.loss.lambda_depth == 0.3 and (c.loss.lambda_near, c.loss.lambda_empty) == (1e-4, 1e-2)
    assert c.occupancy.matte_hull and not preset("paper").occupancy.matte_hull
    assert (c.train.target_samples_per_batch, c.train.max_rays_per_batch) == (4096, 4096)
    assert c.sampler.eval_substeps == 2 and preset("paper").sampler.eval_substeps == 1
    assert preset("paper").sampler.early_stop_eps == 0.0 and preset("paper").loss.lambda_alpha == 0.01


def test_standard_is_the_official_method_on_a_tenth_of_the_schedule():
    paper, c = preset("paper"), preset("standard")
    assert c.name == "standard" and c.train.steps == 30001
    assert c.deformation.window == Schedule(0, 7, 0, 2000) and c.loss.depth_eps == Schedule(0.9, 0.01, 0, 1000)
    assert c.hash.window == Schedule(1, 8, 4000, 8000) and c.optim.lr_step_size == 2000
    assert (c.hash.n_grids, c.hash.n_levels, c.hash.log2_table_size) == (8, 16, 17)
    assert math.isclose(c.hash.base_resolution * c.hash.per_level_scale ** 15, 2048, rel_tol=1e-6)
    # What a short schedule should change, and nothing of the method itself.
    for section in ("sampler", "loss", "occupancy", "field", "scene", "eval", "data"):
        expected = getattr(paper, section)
        if section == "loss":
            expected = expected.__class__(**{**expected.__dict__, "depth_eps": c.loss.depth_eps})
        assert getattr(c, section) == expected, section
    assert c.train.rays_per_batch == paper.train.rays_per_batch and c.train.target_samples_per_batch == 0


def test_overrides_in_every_form():
    c = preset("preview")
    assert c.with_overrides(steps=500).train.steps == 500
    assert c.with_overrides({"hash.n_grids": 2}, hash__window=(1, 2, 0, 10)).hash.window == Schedule(1, 2, 0, 10)
    assert c.with_overrides(depth_eps={"init": 0.5, "final": 0.1, "begin": 0, "end": 5}).loss.depth_eps.init == 0.5
    assert c.with_overrides(steps=500).hash == c.hash  # everything else untouched
    with pytest.raises(KeyError, match="ambiguous"):
        c.with_overrides(begin=3)
    with pytest.raises(KeyError, match="unknown"):
        c.with_overrides(no_such_field=1)
    with pytest.raises(ValueError):
        c.with_overrides(hash__n_grids=2)  # the window still runs to 4 grids
    with pytest.raises(ValueError, match=r"max_rays_per_batch \(512\) >= rays_per_batch \(1024\)"):
        c.with_overrides(max_rays_per_batch=512)


def test_dict_round_trip_is_json():
    c = preset("preview")
    assert NeRSembleConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_schedule_semantics():
    s = Schedule(1.0, 32.0, 40000, 80000)
    assert s.value(0) == 1.0 and s.value(40000) == 1.0
    assert math.isclose(s.value(60000), 16.5) and s.value(80000) == 32.0 and s.value(10**6) == 32.0
    assert s.value(None) == 32.0  # evaluation sees final values
    assert math.isclose(Schedule(0.9, 0.01, 0, 10000).value(5000), 0.455)


def test_cosine_window_values():
    w = cosine_window(2.25, 4)
    expected = [1.0, 1.0, 0.5 * (1 - math.cos(math.pi * 0.25)), 0.0]
    assert [round(float(v), 6) for v in w] == [round(v, 6) for v in expected]


def test_a_cosine_window_first_built_in_inference_mode_serves_training():
    with torch.inference_mode():
        cosine_window(1.625, 3)
    codes = torch.ones(3, requires_grad=True)
    (codes * cosine_window(1.625, 3)).sum().backward()  # the shared window can be saved for backward
    assert torch.equal(codes.grad, cosine_window(1.625, 3))
