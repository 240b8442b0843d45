"""The evaluation filter's blur against the function upstream calls, scipy.ndimage.gaussian_filter (mode 'reflect')."""

import numpy as np
import pytest
import torch

from stages.nersemble.occupancy_filter import filter_occupancy, gaussian_blur3d, reflect_indices

ndimage = pytest.importorskip("scipy.ndimage")

SIGMAS = [0.5, 1.0, 2.3, 7.0]  # 7: upstream's erosion sigma, whose 28-cell radius outgrows a 16-cell grid


def test_padding_is_half_sample_symmetric():
    # d c b a | a b c d | d c b a, and a pad longer than the line keeps reflecting
    assert reflect_indices(4, 4).tolist() == [3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0]
    assert reflect_indices(2, 5).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("shape", [(16, 16, 16), (5, 9, 7)])
def test_float_blur_matches_scipy_reflect(sigma, shape):
    volume = np.random.default_rng(0).random(shape)
    expected = ndimage.gaussian_filter(volume, sigma)  # scipy's default mode: 'reflect'
    got = gaussian_blur3d(torch.from_numpy(volume), sigma).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # the border differs from 'mirror' (torch's reflect padding), so this is a real check of the mode
    assert np.abs(ndimage.gaussian_filter(volume, sigma, mode="mirror") - expected).max() > 1e-3


@pytest.mark.parametrize("sigma", SIGMAS)
def test_integer_blur_matches_scipy_on_integer_arrays_bit_for_bit(sigma):
    """Upstream blurs a uint8 grid (thinning) and an int64 grid (erosion): scipy truncates after every axis."""
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (16, 16, 16)).astype(np.uint8)
    got = gaussian_blur3d(torch.from_numpy(u8.astype(np.float32)), sigma, integer=True).numpy()
    assert np.array_equal(got, ndimage.gaussian_filter(u8, sigma))
    component = (rng.random((16, 16, 16)) > 0.8).astype(np.int64) * 100
    got = gaussian_blur3d(torch.from_numpy(component.astype(np.float32)), sigma, integer=True).numpy()
    assert np.array_equal(got, ndimage.gaussian_filter(component, sigma))
    full = np.full((12, 12, 12), 255, np.uint8)  # sums that land just under an integer truncate as scipy's do
    got = gaussian_blur3d(torch.from_numpy(full.astype(np.float32)), sigma, integer=True).numpy()
    assert np.array_equal(got, ndimage.gaussian_filter(full, sigma))


def _upstream_filter(occs: np.ndarray, threshold: float, sigma_thinning: float, sigma_erosion: float) -> np.ndarray:
    """Upstream's steps 2-6 (reference/nersemble-method.md 6.3) in numpy + scipy, for a grid with one blob."""
    u8 = ((1 / (1 + np.exp(-occs)) - 0.5) * 2 * 255).astype(np.uint8)
    candidates = ndimage.gaussian_filter(u8, sigma_thinning) >= 255 * threshold
    labels, count = ndimage.label(candidates)  # 6-connectivity, as cc3d with connectivity 6
    sizes = ndimage.sum(candidates, labels, range(1, count + 1))
    component = labels == 1 + int(np.argmax(sizes))
    return ndimage.gaussian_filter(component.astype(np.int64) * 100, sigma_erosion) > 0


def test_filter_matches_upstream_steps_with_scipy():
    occs = np.zeros((24, 24, 24))  # upstream's values are EMAs of density x step: never negative
    occs[6:14, 7:15, 8:16] = 6.0  # the subject
    occs[20, 2, 3] = 6.0  # a floater
    occs[1:3, 20:22, 20] = 4.0  # another, near the border where the padding mode matters
    expected = _upstream_filter(occs, 0.05, 1.0, 3.0)
    got = filter_occupancy(torch.from_numpy(occs).float(), threshold=0.05, sigma_thinning=1.0, sigma_erosion=3.0)
    assert np.array_equal(got.numpy(), expected)
    assert not got[20, 2, 3] and got[10, 10, 10]
