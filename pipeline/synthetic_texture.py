"""Procedural textures for the synthetic rig: seeded value noise and the colour recipes built on it.

Feature matchers (SIFT) need texture with structure at a few pixels' scale on every surface, and the
texture must be a function of a surface's canonical coordinates so it moves with the surface. Band-limited
value noise gives both: each octave is smooth below its lattice spacing, so choosing the finest octave a
few pixels wide keeps 220x320 renders from aliasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TABLE = 4096  # random lattice values per seed; a spatial hash picks one per lattice corner
_HASH_PRIMES = (73856093, 19349663, 83492791)


@dataclass(frozen=True)
class NoiseTables:
    """What makes one seed's noise: the random value behind each hashed lattice corner."""

    values: np.ndarray  # (_TABLE,) float32 in [0, 1]

    @classmethod
    def from_seed(cls, seed: int) -> NoiseTables:
        return cls(values=np.random.default_rng(seed).random(_TABLE).astype(np.float32))


# A fixed oblique rotation applied before the lattice lookup: value noise is grid-aligned, and without it
# thresholded blobs come out as axis-aligned squares.
_OBLIQUE = np.linalg.qr(np.array([[0.8, -0.4, 0.3], [0.5, 0.7, -0.2], [-0.1, 0.45, 0.9]]))[0]


def _fade(x: np.ndarray) -> np.ndarray:
    """Quintic fade: C2-continuous interpolation weights, so shading of the texture shows no lattice lines."""
    return x * x * x * (x * (x * 6.0 - 15.0) + 10.0)


def _lerp(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return a + (b - a) * weight


def value_noise_3d(tables: NoiseTables, points: np.ndarray) -> np.ndarray:
    """Smooth noise in [0, 1] (float32) at (N, 3) points, about one lattice cell per unit.

    Corners are hashed arithmetically (one table gather per corner) and blended by nested lerps: this is
    the renderer's hot loop.
    """
    points = points @ _OBLIQUE
    base = np.floor(points)
    weights = _fade((points - base).astype(np.float32))
    cell = base.astype(np.int64)
    hashed = [(cell[:, axis] * prime, (cell[:, axis] + 1) * prime) for axis, prime in enumerate(_HASH_PRIMES)]

    def corner(dx: int, dy: int, dz: int) -> np.ndarray:
        key = hashed[0][dx] ^ hashed[1][dy] ^ hashed[2][dz]
        return tables.values[(key ^ (key >> 15)) & (_TABLE - 1)]

    wx, wy, wz = weights[:, 0], weights[:, 1], weights[:, 2]
    near = _lerp(_lerp(corner(0, 0, 0), corner(1, 0, 0), wx), _lerp(corner(0, 1, 0), corner(1, 1, 0), wx), wy)
    far = _lerp(_lerp(corner(0, 0, 1), corner(1, 0, 1), wx), _lerp(corner(0, 1, 1), corner(1, 1, 1), wx), wy)
    return _lerp(near, far, wz)


def fbm_3d(tables: NoiseTables, points: np.ndarray, wavelength: float, octaves: int, gain: float = 0.55) -> np.ndarray:
    """Multi-octave noise in [0, 1]; ``wavelength`` (metres) is the coarsest lattice spacing, each octave halves it."""
    total = np.zeros(points.shape[0], dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    scale = 1.0 / wavelength
    for octave in range(octaves):
        # a fixed per-octave offset decorrelates the octaves' lattices
        total += amplitude * value_noise_3d(tables, points * scale + 17.31 * (octave + 1))
        norm += amplitude
        amplitude *= gain
        scale *= 2.0
    return total / norm


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def mix(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-point blend of (N, 3) colours a -> b by (N,) weight."""
    return a + (b - a) * weight[:, None]


# --- colour recipes -------------------------------------------------------------------------------------

SKIN = np.array([0.86, 0.64, 0.52])
SKIN_DARK = np.array([0.62, 0.38, 0.30])
SKIN_LIGHT = np.array([0.96, 0.80, 0.70])
HAIR = np.array([0.24, 0.15, 0.09])
HAIR_LIGHT = np.array([0.45, 0.32, 0.20])
LIP = np.array([0.72, 0.30, 0.30])
BROW = np.array([0.22, 0.14, 0.10])
SCLERA = np.array([0.93, 0.92, 0.88])
IRIS = np.array([0.30, 0.42, 0.22])
PUPIL = np.array([0.04, 0.03, 0.03])


def skin_colour(tables: NoiseTables, points: np.ndarray) -> np.ndarray:
    """Mottled skin with freckle-like blobs: the structure SIFT locks onto, in (N, 3) linear-ish RGB."""
    mottle = fbm_3d(tables, points, wavelength=0.024, octaves=3)
    blobs = smoothstep(0.58, 0.72, value_noise_3d(tables, points / 0.006 + 101.7))
    light = smoothstep(0.60, 0.75, value_noise_3d(tables, points / 0.011 + 57.3))
    colour = SKIN * (0.72 + 0.56 * mottle)[:, None]
    colour = mix(colour, SKIN_LIGHT, 0.55 * light)
    return mix(colour, SKIN_DARK, 0.8 * blobs)


def hair_colour(tables: NoiseTables, points: np.ndarray) -> np.ndarray:
    """Dark hair with streaks: noise stretched along the strands (head-frame y) gives anisotropic texture."""
    streaks = fbm_3d(tables, points * np.array([1.0, 0.25, 1.0]), wavelength=0.010, octaves=2)
    clumps = value_noise_3d(tables, points / 0.02 + 33.1)
    return mix(HAIR, HAIR_LIGHT, np.clip(1.6 * streaks * clumps, 0.0, 1.0))


def eye_colour(local_direction: np.ndarray) -> np.ndarray:
    """Sclera, iris ring and pupil from the hit's direction in the eyeball's frame (z = gaze)."""
    gaze_cos = local_direction[:, 2]
    colour = np.broadcast_to(SCLERA, local_direction.shape).copy()
    colour = mix(colour, IRIS, smoothstep(0.86, 0.90, gaze_cos))
    return mix(colour, PUPIL, smoothstep(0.965, 0.975, gaze_cos))


def backdrop_colour(tables: NoiseTables, uv: np.ndarray) -> np.ndarray:
    """Studio backdrop in (N, 3) RGB from (N, 2) surface coordinates in metres.

    Cool grey-blue and green panels with fine mottling, plus large beige patches whose colour sits close
    to skin, so matting against the plate works but cannot rely on colour alone.
    """
    points = np.concatenate([uv, np.zeros((uv.shape[0], 1))], axis=1)
    panels = fbm_3d(tables, points + 211.0, wavelength=0.30, octaves=2)
    mottle = fbm_3d(tables, points + 503.0, wavelength=0.06, octaves=3)
    beige = smoothstep(0.68, 0.74, value_noise_3d(tables, points / 0.20 + 77.0))
    blue, green = np.array([0.36, 0.46, 0.60]), np.array([0.38, 0.55, 0.42])
    colour = mix(np.broadcast_to(blue, points.shape), green, smoothstep(0.35, 0.65, panels))
    colour = colour * (0.70 + 0.60 * mottle)[:, None]
    skin_like = SKIN * (0.85 + 0.3 * mottle)[:, None]
    return mix(colour, skin_like, beige)
