"""Ensemble blend rules over the warm-up, trunc_exp, and the field's box and background behaviour."""

from __future__ import annotations

import math

import torch

from stages.nersemble.config import preset
from stages.nersemble.field import (NeRSembleField, ensemble_weights, grid_window, pad_with_ones, padded_width,
                                    trunc_exp)
from stages.nersemble.model import NeRSembleModel

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def test_warm_up_uses_grid_0_with_weight_1():
    codes = torch.randn(5, 4)
    weights = ensemble_weights(codes, 1.0, 4)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0, 0, 0]).expand(5, 4))
    assert torch.equal(ensemble_weights(None, 1.0, 4, n_samples=5), weights)  # codes not even needed


def test_window_schedule_drives_the_blend():
    model = NeRSembleModel(preset("preview"), n_timesteps=3, scene_box=BOX, backend="torch")
    # preview: hash window 1 -> 4 over steps 400 -> 800; warm-up until (and at) step 400.
    assert model.windows(0).hash == 1.0 and model.windows(400).hash == 1.0
    assert math.isclose(model.windows(600).hash, 2.5) and model.windows(None).hash == 4.0
    t = torch.tensor([0, 1, 2])
    torch.testing.assert_close(model.blend_weights(t, model.windows(100)), torch.tensor([1.0, 0, 0, 0]).expand(3, 4))
    codes = model.codes.blend.weight.detach()
    late = model.blend_weights(t, model.windows(None))  # all grids on: the raw codes, unnormalised
    torch.testing.assert_close(late.detach(), codes)


def test_soft_transition_of_grid_0():
    codes = torch.tensor([[0.2, 0.4, 0.6, 0.8]])
    a = 0.5  # window 1.5: grid 0 halfway from 1 to its code, grid 1 half faded in
    w = ensemble_weights(codes, 1.5, 4)
    expected = torch.tensor([[a * 0.2 + (1 - a), a * 0.4 * 0.5, 0.0, 0.0]])
    torch.testing.assert_close(w, expected)
    no_soft = ensemble_weights(codes, 1.5, 4, soft_transition=False)
    torch.testing.assert_close(no_soft, torch.tensor([[0.2, 0.4 * 0.5, 0.0, 0.0]]))
    # Continuous where the rules switch: just after 1 it is ~[1, 0, ...]; at 2 the plain codes x window.
    just_after = ensemble_weights(codes, 1.0 + 1e-6, 4)
    torch.testing.assert_close(just_after, torch.tensor([[1.0, 0, 0, 0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ensemble_weights(codes, 2.0, 4), torch.tensor([[0.2, 0.4, 0.0, 0.0]]))


def test_cosine_grid_window_values():
    w = grid_window(2.25, 4)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, 0.5 * (1 - math.cos(math.pi / 4)), 0.0]))
    assert torch.equal(grid_window(4.0, 4), torch.ones(4))


def test_trunc_exp_clamps_the_gradient():
    x = torch.tensor([-20.0, 0.0, 1.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    torch.testing.assert_close(y, torch.exp(x.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.exp(torch.tensor([-15.0, 0.0, 1.0, 15.0])))


def test_density_zero_outside_box_and_bias_free_mlps():
    config = preset("preview")
    field = NeRSembleField(config.hash, config.field, BOX, backend="torch")
    assert all(m.bias is None for m in field.modules() if isinstance(m, torch.nn.Linear))
    assert field.density_mlp[0].in_features == 16 and field.density_mlp[-1].out_features == 16
    assert field.color_mlp[0].in_features == 32 and field.color_mlp[-1].out_features == 3  # 18 inputs, padded
    x = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.0, -1.0, 0.0], [0.2, 0.3, -0.9]])
    blend = torch.ones(4, 4)
    sigma, geo = field.density(x, blend)
    assert sigma[1] == 0 and sigma[2] == 0  # outside / on the boundary of the open box
    assert (sigma[[0, 3]] > 0).all() and geo.shape == (4, 15)
    rgb = field.color(torch.nn.functional.normalize(torch.randn(4, 3), dim=-1), geo)
    assert rgb.shape == (4, 3) and (rgb > 0).all() and (rgb < 1).all()


def test_rays_missing_the_box_render_white():
    model = NeRSembleModel(preset("preview"), n_timesteps=1, scene_box=BOX, backend="torch").eval()
    origins = torch.tensor([[0.0, 0.0, -5.0], [3.0, 3.0, -5.0]])
    directions = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = model(origins, directions, 0)
    assert out["alpha"][1] == 0 and torch.equal(out["rgb"][1], torch.ones(3))  # no samples: background only
    assert 0 < out["alpha"][0] <= 1  # through the box: at init the density is ~exp(0) = 1 everywhere


# --- tcnn's input padding -------------------------------------------------------------------------------------


def test_mlp_inputs_are_padded_to_sixteen_with_ones_as_tcnn_does():
    assert [padded_width(n) for n in (12, 16, 18, 32, 33)] == [16, 16, 32, 32, 48]
    x = torch.arange(6.0).view(2, 3)
    assert torch.equal(pad_with_ones(x, 16)[:, 3:], torch.ones(2, 13)) and torch.equal(pad_with_ones(x, 16)[:, :3], x)
    assert pad_with_ones(x, 3) is x


def test_colour_padding_is_a_first_layer_bias():
    """The 14 padded ones times their weights equal an 18-input first layer with bias = those weights' row sums."""
    config = preset("preview")
    field = NeRSembleField(config.hash, config.field, BOX, backend="torch")
    first = field.color_mlp[0]
    assert first.in_features == 32 and first.bias is None
    directions = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    geo = torch.randn(5, 15)
    unpadded = torch.nn.Linear(18, first.out_features)
    with torch.no_grad():
        unpadded.weight.copy_(first.weight[:, :18])
        unpadded.bias.copy_(first.weight[:, 18:].sum(1))
        expected = torch.sigmoid(torch.nn.Sequential(unpadded, *field.color_mlp[1:])(
            torch.cat([(directions + 1) / 2, geo], dim=-1)))
        torch.testing.assert_close(field.color(directions, geo), expected)
        assert first.weight[:, 18:].sum(1).abs().max() > 0  # the implicit bias is really there at initialisation
    # Xavier bounds over the padded widths, as tcnn initialises its padded matrices (64 x 32, and 16 x 64 outputs)
    assert first.weight.abs().max() <= math.sqrt(6 / (32 + 64))
    assert first.weight.abs().max() > math.sqrt(6 / (18 + 64)) * 0.8
    assert field.color_mlp[-1].weight.abs().max() <= math.sqrt(6 / (64 + 16))


def test_checkpoints_from_before_the_padding_compute_what_they_did():
    config = preset("preview")
    field = NeRSembleField(config.hash, config.field, BOX, backend="torch")
    state = {k: v.clone() for k, v in field.state_dict().items()}
    old_weight = state["color_mlp.0.weight"][:, :18].clone()
    state["color_mlp.0.weight"] = old_weight  # what an unpadded model saved
    field.load_state_dict(state)
    assert torch.equal(field.color_mlp[0].weight[:, :18], old_weight)
    assert torch.equal(field.color_mlp[0].weight[:, 18:], torch.zeros(old_weight.shape[0], 14))
    directions = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    geo = torch.randn(4, 15)
    with torch.no_grad():
        unpadded = torch.nn.functional.linear(torch.cat([(directions + 1) / 2, geo], dim=-1), old_weight)
        expected = torch.sigmoid(torch.nn.Sequential(*field.color_mlp[1:])(unpadded))
        torch.testing.assert_close(field.color(directions, geo), expected)


def test_the_density_mlp_takes_the_hash_features_as_they_are():
    config = preset("preview").with_overrides({"hash.n_levels": 6})  # 12 features: no preset has this width
    field = NeRSembleField(config.hash, config.field, BOX, backend="torch")
    assert field.density_mlp[0].in_features == 12
    assert all(preset(name).hash.n_levels * preset(name).hash.features_per_level % 16 == 0
               for name in ("preview", "paper"))  # where tcnn would pad nothing either
