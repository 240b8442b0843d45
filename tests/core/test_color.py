"""Colour correction: identity leaves images alone, a known matrix acts in linear light, bad files are named."""

import json

import numpy as np
import pytest

from stages.core.color import (CHEUNG_TERMS, apply_color_correction, expand_cheung2004, linear_to_srgb,
                            read_color_calibration, srgb_to_linear)
from stages.core.errors import CalibrationError


def _identity(terms: int) -> np.ndarray:
    matrix = np.zeros((3, terms))
    matrix[:, :3] = np.eye(3)
    return matrix


def test_srgb_transfer_round_trip():
    values = np.linspace(0, 1, 1001, dtype=np.float32)
    np.testing.assert_allclose(linear_to_srgb(srgb_to_linear(values)), values, atol=1e-5)
    assert srgb_to_linear(np.float32(0.5)) == pytest.approx(0.21404, abs=1e-4)


@pytest.mark.parametrize("terms", sorted(CHEUNG_TERMS))
def test_identity_matrix_keeps_the_image(terms):
    image = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(apply_color_correction(image, _identity(terms)), image)


def test_expansion_terms():
    rgb = np.array([0.2, 0.3, 0.5], dtype=np.float32)
    expanded = expand_cheung2004(rgb, 8)
    np.testing.assert_allclose(expanded, [0.2, 0.3, 0.5, 0.06, 0.1, 0.15, 0.03, 1.0], rtol=1e-6)
    assert expand_cheung2004(rgb, 22).shape == (22,)
    with pytest.raises(ValueError, match="6 terms"):
        expand_cheung2004(rgb, 6)


def test_gain_acts_in_linear_light():
    image = np.full((2, 2, 3), 128, np.uint8)
    doubled = apply_color_correction(image, 2 * _identity(3))
    expected = linear_to_srgb(2 * srgb_to_linear(np.float32(128 / 255))) * 255
    assert doubled[0, 0, 0] == round(float(expected))  # not 255, which a gain on sRGB values would give


def test_read_color_calibration(tmp_path):
    path = tmp_path / "color_calibration.json"
    path.write_text(json.dumps({"222200037": _identity(11).tolist()}))
    assert read_color_calibration(path)["222200037"].shape == (3, 11)
    path.write_text(json.dumps({"222200037": np.eye(4).tolist()}))
    with pytest.raises(CalibrationError, match="camera 222200037") as error:
        read_color_calibration(path)
    assert str(path) in str(error.value)


def test_correction_memory_does_not_grow_with_the_frame():
    """Ingest corrects one frame per decoder at once: its float temporaries must stay a few MiB, not ~60 frames."""
    import tracemalloc

    matrix = np.random.default_rng(2).normal(0, 0.05, (3, 22))
    matrix[:, :3] += np.eye(3)
    peaks = {}
    for height, width in ((802, 550), (1604, 1100)):
        image = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
        tracemalloc.start()
        corrected = apply_color_correction(image, matrix)
        peaks[height] = tracemalloc.get_traced_memory()[1] - corrected.nbytes
        tracemalloc.stop()
    assert peaks[1604] < 32 * 2**20 and peaks[1604] < 1.5 * peaks[802]  # 4x the pixels, the same temporaries
