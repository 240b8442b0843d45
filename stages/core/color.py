"""Per-camera colour correction of the NeRSemble v2 rig (Cheung et al. 2004 polynomial, in linear sRGB).

``color_calibration.json`` maps serial -> a 3 x terms matrix. A pixel is decoded from sRGB to linear light,
expanded into the polynomial terms below, multiplied by the matrix and encoded back to sRGB.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.core.errors import CalibrationError

# Exponents (r, g, b) of each term, in the order of the Cheung 2004 / Westland 2004 augmented matrices.
_LINEAR = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
_CROSS = [(1, 1, 0), (1, 0, 1), (0, 1, 1)]
_SQUARES = [(2, 0, 0), (0, 2, 0), (0, 0, 2)]
_RGB = [(1, 1, 1)]
_ONE = [(0, 0, 0)]
_CUBES = [(3, 0, 0), (0, 3, 0), (0, 0, 3)]
_MIXED_A = [(2, 1, 0), (0, 2, 1), (1, 0, 2)]  # R^2 G, G^2 B, B^2 R
_MIXED_B = [(2, 0, 1), (1, 2, 0), (0, 1, 2)]  # R^2 B, G^2 R, B^2 G
_QUARTIC_MIXED = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]

CHEUNG_TERMS: dict[int, list[tuple[int, int, int]]] = {
    3: _LINEAR,
    4: _LINEAR + _ONE,
    5: _LINEAR + _RGB + _ONE,
    7: _LINEAR + _CROSS + _ONE,
    8: _LINEAR + _CROSS + _RGB + _ONE,
    10: _LINEAR + _CROSS + _SQUARES + _ONE,
    11: _LINEAR + _CROSS + _SQUARES + _RGB + _ONE,
    14: _LINEAR + _CROSS + _SQUARES + _RGB + _CUBES + _ONE,
    16: _LINEAR + _CROSS + _SQUARES + _RGB + _MIXED_A + _CUBES,
    17: _LINEAR + _CROSS + _SQUARES + _RGB + _MIXED_A + _CUBES + _ONE,
    19: _LINEAR + _CROSS + _SQUARES + _RGB + _MIXED_A + _MIXED_B + _CUBES,
    20: _LINEAR + _CROSS + _SQUARES + _RGB + _MIXED_A + _MIXED_B + _CUBES + _ONE,
    22: _LINEAR + _CROSS + _SQUARES + _RGB + _MIXED_A + _MIXED_B + _CUBES + _QUARTIC_MIXED,
}


def srgb_to_linear(encoded: np.ndarray) -> np.ndarray:
    encoded = np.asarray(encoded, dtype=np.float32)
    return np.where(encoded <= 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    linear = np.asarray(linear, dtype=np.float32)
    safe = np.maximum(linear, 0.0031308)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * safe ** (1 / 2.4) - 0.055).astype(np.float32)


# uint8 -> linear is a 256-entry table: exact and much cheaper than the power per pixel.
_LINEAR_OF_BYTE = srgb_to_linear(np.arange(256, dtype=np.float32) / 255.0)


def expand_cheung2004(linear_rgb: np.ndarray, terms: int) -> np.ndarray:
    """(..., 3) linear RGB -> (..., terms) polynomial features."""
    if terms not in CHEUNG_TERMS:
        raise ValueError(f"Cheung 2004 has no expansion with {terms} terms; supported: {sorted(CHEUNG_TERMS)}")
    r, g, b = (linear_rgb[..., i] for i in range(3))
    powers = [(r**i if i else 1.0) * (g**j if j else 1.0) * (b**k if k else 1.0) for i, j, k in CHEUNG_TERMS[terms]]
    return np.stack([np.broadcast_to(p, r.shape) for p in powers], axis=-1).astype(np.float32)


COLOR_STRIP_PIXELS = 1 << 16  # pixels corrected at a time: a whole frame's polynomial terms (float32, up to 22
#                                  per pixel, twice over while stacked) would take ~60 times the frame's own bytes


def apply_color_correction(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Correct an (H, W, 3) uint8 sRGB image with a 3 x terms matrix; returns uint8.

    Strip by strip, so the float temporaries stay a few MiB whatever the frame size (ingest runs one of these
    per decoder at once).
    """
    pixels = np.ascontiguousarray(image).reshape(-1, 3)
    out = np.empty(pixels.shape, np.uint8)
    weights = np.asarray(matrix, dtype=np.float32).T
    for start in range(0, len(pixels), COLOR_STRIP_PIXELS):
        strip = slice(start, start + COLOR_STRIP_PIXELS)
        corrected = expand_cheung2004(_LINEAR_OF_BYTE[pixels[strip]], weights.shape[0]) @ weights
        out[strip] = np.clip(np.rint(linear_to_srgb(corrected) * 255.0), 0, 255).astype(np.uint8)
    return out.reshape(np.shape(image))


def read_color_calibration(path: str | Path) -> dict[str, np.ndarray]:
    """Read ``color_calibration.json``: serial -> (3, terms) matrix, checked."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"{path}: colour calibration file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CalibrationError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise CalibrationError(f"{path}: expected a mapping serial -> 3 x terms matrix")
    matrices = {}
    for serial, value in data.items():
        try:
            matrix = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise CalibrationError(f"{path}: matrix of camera {serial} is not numeric") from None
        if matrix.ndim != 2 or matrix.shape[0] != 3 or matrix.shape[1] not in CHEUNG_TERMS:
            raise CalibrationError(
                f"{path}: matrix of camera {serial} has shape {matrix.shape}; expected (3, terms) with terms in "
                f"{sorted(CHEUNG_TERMS)}"
            )
        matrices[str(serial)] = matrix
    return matrices
