"""Deformation field: identity at init, encoding layout and window, SE(3) exponential, offset units."""

from __future__ import annotations

import math

import torch

from stages.nersemble.config import DeformationConfig, preset
from stages.nersemble.deformation import SE3DeformationField, deform_positions, se3_exp, windowed_posenc
from stages.nersemble.field import TimeCodes
from stages.nersemble.model import NeRSembleModel

BOX = torch.tensor([[-2.0, -1.5, -2.5], [2.0, 2.5, 2.0]])
# The paper's deformation field and codes; the preview's hash grids keep the model small (not under test here).
PAPER = preset("paper").with_overrides({"hash": preset("preview").hash})


def _points(n=500):
    torch.manual_seed(0)
    return BOX[0] + torch.rand(n, 3) * (BOX[1] - BOX[0])


def test_warp_is_identity_at_step_0():
    # Zero heads: the exponential of a zero screw axis is exactly the identity.
    config = PAPER.with_overrides(head_init=0.0)
    model = NeRSembleModel(config, n_timesteps=5, scene_box=BOX, backend="torch")
    x = _points()
    t = torch.randint(0, 5, (x.shape[0],))
    warped, offset = model.canonical_positions(x, t, model.windows(0))
    assert (warped - x).abs().max() <= 1e-6 and offset.abs().max() <= 1e-6


def test_paper_init_is_near_identity():
    # Upstream's U(+-1e-5) heads: a ~1e-5 warp (about a micrometre at world scale 9), not exactly zero.
    model = NeRSembleModel(PAPER, n_timesteps=5, scene_box=BOX, backend="torch")
    x = _points()
    warped, _ = model.canonical_positions(x, torch.zeros(x.shape[0], dtype=torch.long), model.windows(0))
    assert (warped - x).abs().max() < 1e-4


def test_posenc_layout_and_window():
    x = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    full = windowed_posenc(x, 7, alpha=7.0)
    assert full.shape == (1, 45)
    u = 2 * math.pi * x[0]
    assert math.isclose(float(full[0, 7 + 3]), math.sin(u[1] * 2**3))  # axis 1, frequency 3
    assert math.isclose(float(full[0, 21 + 14 + 6]), math.cos(u[2] * 2**6), abs_tol=1e-12)  # cos, axis 2, f 6
    torch.testing.assert_close(full[0, 42:], u)  # include_input appends 2 pi x, not x
    closed = windowed_posenc(x, 7, alpha=0.0)
    assert closed[0, :42].abs().max() == 0 and torch.equal(closed[0, 42:], full[0, 42:])
    half = windowed_posenc(x, 7, alpha=2.5)
    ratio = half[0, :21] / full[0, :21]
    per_band = ratio.view(3, 7)[0]  # the same window on every axis
    torch.testing.assert_close(per_band, torch.tensor([1, 1, 0.5, 0, 0, 0, 0], dtype=torch.float64))


def test_se3_exp_matches_rodrigues_and_translation():
    r = torch.tensor([[0.0, 0.0, math.pi / 2]], dtype=torch.float64)
    v = torch.zeros(1, 3, dtype=torch.float64)
    rotation, translation = se3_exp(v, r)
    torch.testing.assert_close(rotation[0], torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64))
    assert translation.abs().max() == 0
    v = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    rotation, translation = se3_exp(v, torch.zeros(1, 3, dtype=torch.float64))
    torch.testing.assert_close(rotation[0], torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(translation[0], torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    # Screw motion: translation = V v with V the left Jacobian; orthonormal rotation.
    rotation, _ = se3_exp(torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64))
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(10, 3, 3))


def test_offset_units_paper_vs_box():
    field = SE3DeformationField(DeformationConfig(head_init=0.0), code_dim=4)
    with torch.no_grad():
        field.head_translation.bias.copy_(torch.tensor([0.1, 0.0, 0.0]))  # pure translation of 0.1 box units
    x = _points(10)
    codes = torch.zeros(10, 4)
    paper, delta = deform_positions(x, BOX, field, codes, 7.0, "paper")
    box, _ = deform_positions(x, BOX, field, codes, 7.0, "box")
    torch.testing.assert_close(paper - x, torch.tensor([0.1, 0.0, 0.0]).expand(10, 3))  # normalised offset, added raw
    torch.testing.assert_close(box - x, torch.tensor([0.1 * 4.0, 0.0, 0.0]).expand(10, 3))  # scaled by the extent
    torch.testing.assert_close(delta, paper - x)


def test_nan_falls_back_to_input():
    field = SE3DeformationField(DeformationConfig(), code_dim=4)
    x = torch.rand(3, 3)
    codes = torch.full((3, 4), float("nan"))
    torch.testing.assert_close(field(x, codes, 7.0), x)


def test_code_initialisation_scales():
    torch.manual_seed(0)
    codes = TimeCodes(2000, 32, preset("paper").codes)
    assert math.isclose(float(codes.blend.weight.detach().std()), 0.01 / math.sqrt(32), rel_tol=0.05)
    assert math.isclose(float(codes.deformation.weight.detach().std()), 0.01 / math.sqrt(128), rel_tol=0.05)
