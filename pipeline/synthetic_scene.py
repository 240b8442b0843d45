"""The synthetic subject and backdrop as analytic geometry: posed ellipsoids and a cylinder, ray cast exactly.

World frame (metres): origin at the centre of the resting head, y up, +z out of the face towards the
frontal cameras, so +x is the subject's left and the right of an image taken from the front. The subject
is a bust made of ellipsoids (cranium, face, jaw, nose, eyes, ears, cheeks, neck, torso); the backdrop is
a vertical cylinder around the subject that encloses the rig, so every camera sees it behind the head.

Time ``t`` is normalised sequence time in [0, 1] (values outside extrapolate smoothly). The head turns and
nods rigidly about the top of the neck, the jaw opens about its hinge and the cheeks puff, so the motion
is rigid plus non-rigid. Texture lives in the head's rest frame, so it moves with the surface.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline import synthetic_texture as tex

BACKDROP_RADIUS = 1.8  # metres; larger than the rig's radius, so cameras sit inside the cylinder
HEAD_PIVOT = np.array([0.0, -0.08, -0.02])  # top of the neck: the head turns about this point
JAW_HINGE = np.array([0.0, -0.03, -0.02])  # in the head frame, roughly between the ears
LIGHT_KEY = np.array([0.45, 0.55, 0.70]) / np.linalg.norm([0.45, 0.55, 0.70])
LIGHT_FILL = np.array([-0.70, 0.10, 0.50]) / np.linalg.norm([-0.70, 0.10, 0.50])
AMBIENT, KEY, FILL = 0.32, 0.62, 0.22
_NO_HIT = -1


def rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rotation_y(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class Part:
    """One ellipsoid of the bust in its rest pose (head frame == world frame at rest)."""

    name: str
    group: str  # "body" (static), "head" (rigid head motion) or "jaw" (head motion, then the jaw hinge)
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)  # x, y, z angles (radians), applied z, y, x
    puffs: bool = False  # radii grow with the cheek-puff signal

    def rest_rotation(self) -> np.ndarray:
        ax, ay, az = self.rotation
        return rotation_x(ax) @ rotation_y(ay) @ rotation_z(az)


PARTS: tuple[Part, ...] = (
    Part("cranium", "head", (0.0, 0.02, -0.005), (0.075, 0.105, 0.095)),
    Part("face", "head", (0.0, -0.01, 0.03), (0.065, 0.08, 0.075)),
    Part("jaw", "jaw", (0.0, -0.065, 0.03), (0.055, 0.04, 0.065)),
    Part("nose", "head", (0.0, -0.012, 0.090), (0.015, 0.025, 0.022), rotation=(-0.35, 0.0, 0.0)),
    Part("eye_right", "head", (-0.030, 0.024, 0.079), (0.0125, 0.0125, 0.0125)),
    Part("eye_left", "head", (0.030, 0.024, 0.079), (0.0125, 0.0125, 0.0125)),
    Part("ear_right", "head", (-0.076, 0.0, -0.012), (0.012, 0.030, 0.020), rotation=(0.0, -0.3, 0.0)),
    Part("ear_left", "head", (0.076, 0.0, -0.012), (0.012, 0.030, 0.020), rotation=(0.0, 0.3, 0.0)),
    Part("cheek_right", "head", (-0.040, -0.032, 0.052), (0.028, 0.025, 0.026), puffs=True),
    Part("cheek_left", "head", (0.040, -0.032, 0.052), (0.028, 0.025, 0.026), puffs=True),
    Part("neck", "body", (0.0, -0.14, -0.02), (0.050, 0.10, 0.052)),
    Part("torso", "body", (0.0, -0.33, -0.03), (0.19, 0.12, 0.11)),
)
PART_INDEX = {part.name: index for index, part in enumerate(PARTS)}
EYES = (PART_INDEX["eye_right"], PART_INDEX["eye_left"])


# --- motion -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Motion:
    """Amplitudes (radians / fractions) and seed-dependent phases of the head's motion signals."""

    phases: tuple[float, ...]
    yaw: float = np.radians(18.0)
    pitch: float = np.radians(8.0)
    roll: float = np.radians(3.0)
    jaw: float = np.radians(17.0)
    puff: float = 0.35

    @classmethod
    def from_seed(cls, seed: int) -> Motion:
        rng = np.random.default_rng([seed, 1])
        return cls(phases=tuple(float(p) for p in rng.uniform(-0.15, 0.15, 5)))

    def head_rotation(self, t: float) -> np.ndarray:
        """A turn across the sequence (monotonic in t), a nod and a little roll."""
        p = self.phases
        yaw = self.yaw * np.sin(np.pi * (t - 0.5) + p[0])
        pitch = self.pitch * np.sin(2.0 * np.pi * t + p[1])
        roll = self.roll * np.sin(3.0 * np.pi * t + p[2])
        return rotation_y(yaw) @ rotation_x(pitch) @ rotation_z(roll)

    def jaw_angle(self, t: float) -> float:
        """Closed at the start, open, closed, open again: the jaw moves between every pair of distant frames."""
        return self.jaw * 0.5 * (1.0 - np.cos(3.0 * np.pi * t + self.phases[3]))

    def puff_scale(self, t: float) -> float:
        return 1.0 + self.puff * 0.5 * (1.0 - np.cos(2.0 * np.pi * t + self.phases[4]))


def _group_transform(motion: Motion, group: str, t: float) -> tuple[np.ndarray, np.ndarray]:
    """(rotation, translation) taking rest-pose points of a group to world points at time t."""
    if group == "body":
        return np.eye(3), np.zeros(3)
    head_r = motion.head_rotation(t)
    head_t = HEAD_PIVOT - head_r @ HEAD_PIVOT
    if group == "head":
        return head_r, head_t
    jaw_r = rotation_x(motion.jaw_angle(t))
    jaw_t = JAW_HINGE - jaw_r @ JAW_HINGE
    return head_r @ jaw_r, head_r @ jaw_t + head_t


@dataclass(frozen=True)
class PosedParts:
    """Every ellipsoid at one time: world centre, world rotation (local -> world), radii, plus rest data."""

    centres: np.ndarray  # (P, 3)
    rotations: np.ndarray  # (P, 3, 3)
    radii: np.ndarray  # (P, 3)
    rest_centres: np.ndarray  # (P, 3)
    rest_rotations: np.ndarray  # (P, 3, 3)
    rest_radii: np.ndarray  # (P, 3)


def pose_parts(motion: Motion, t: float) -> PosedParts:
    centres, rotations, radii = [], [], []
    for part in PARTS:
        group_r, group_t = _group_transform(motion, part.group, t)
        centres.append(group_r @ np.asarray(part.centre) + group_t)
        rotations.append(group_r @ part.rest_rotation())
        radii.append(np.asarray(part.radii) * (motion.puff_scale(t) if part.puffs else 1.0))
    return PosedParts(
        centres=np.array(centres),
        rotations=np.array(rotations),
        radii=np.array(radii),
        rest_centres=np.array([part.centre for part in PARTS], dtype=np.float64),
        rest_rotations=np.array([part.rest_rotation() for part in PARTS]),
        rest_radii=np.array([part.radii for part in PARTS], dtype=np.float64),
    )


# --- ray casting --------------------------------------------------------------------------------------------


def _ray_sphere_hits(origin: np.ndarray, directions: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    """Boolean (N,) mask of unit-direction rays from one origin that meet a sphere: the culling test."""
    offset = origin - centre
    b = directions @ offset
    return b * b - (offset @ offset - radius * radius) >= 0.0


def _ray_ellipsoid_distance(origin: np.ndarray, directions: np.ndarray, centre: np.ndarray,
                            rotation: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Distance along each ray to the ellipsoid's front surface (inf on a miss), for an outside origin.

    The ray is mapped into the ellipsoid's unit-sphere space, an affine map that keeps the ray parameter,
    and the near root of the quadratic is taken in the cancellation-free form.
    """
    o = (rotation.T @ (origin - centre)) / radii
    d = (directions @ rotation) / radii
    a = np.einsum("ij,ij->i", d, d)
    half_b = d @ o
    c = o @ o - 1.0
    disc = half_b * half_b - a * c
    hit = disc >= 0.0
    root = np.sqrt(np.where(hit, disc, 0.0))
    q = -half_b + np.where(half_b <= 0.0, root, -root)
    with np.errstate(divide="ignore", invalid="ignore"):
        near = np.minimum(q / a, c / q)
    return np.where(hit & (near > 0.0), near, np.inf)


@dataclass(frozen=True)
class SubjectHits:
    """Nearest subject hit per ray: distance along the unit ray (inf on a miss) and the part index (-1)."""

    distance: np.ndarray
    part: np.ndarray


def _bounding_radius(radii: np.ndarray) -> float:
    """Radius of a sphere around an ellipsoid, padded so rounding can never cull a ray that touches it."""
    return float(radii.max()) * (1.0 + 1e-9) + 1e-9


def cast_subject(posed: PosedParts, origin: np.ndarray, directions: np.ndarray) -> SubjectHits:
    """Z-buffered intersection of rays with the union of ellipsoids: the nearest hit over all parts wins.

    Each part only sees the rays that meet its bounding sphere, which makes small parts (eyes, nose) cheap.
    """
    distance = np.full(directions.shape[0], np.inf)
    part = np.full(directions.shape[0], _NO_HIT, dtype=np.int64)
    for index in range(len(PARTS)):
        centre = posed.centres[index]
        radii = posed.radii[index]
        candidates = np.flatnonzero(_ray_sphere_hits(origin, directions, centre, _bounding_radius(radii)))
        if candidates.size == 0:
            continue
        near = _ray_ellipsoid_distance(origin, directions[candidates], centre, posed.rotations[index], radii)
        closer = near < distance[candidates]
        distance[candidates[closer]] = near[closer]
        part[candidates[closer]] = index
    return SubjectHits(distance=distance, part=part)


@dataclass(frozen=True)
class SurfaceSamples:
    """Hit points of the rays that met the subject, with what shading and texturing need."""

    points: np.ndarray  # (M, 3) world
    normals: np.ndarray  # (M, 3) world, unit
    canonical: np.ndarray  # (M, 3) rest-pose head-frame point, the texture coordinate
    local: np.ndarray  # (M, 3) point on the part's unit sphere (eye gaze direction for the eyeballs)
    part: np.ndarray  # (M,)


def surface_samples(posed: PosedParts, origin: np.ndarray, directions: np.ndarray, hits: SubjectHits) -> SurfaceSamples:
    """Per-hit geometry, each hit mapped through its own ellipsoid's unit-sphere frame (all hits at once)."""
    found = np.flatnonzero(hits.part != _NO_HIT)
    part = hits.part[found]
    points = origin + directions[found] * hits.distance[found][:, None]
    rotation, radii = posed.rotations[part], posed.radii[part]
    unit = np.einsum("mi,mij->mj", points - posed.centres[part], rotation) / radii
    normals = np.einsum("mij,mj->mi", rotation, unit / radii)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    rest_offset = np.einsum("mij,mj->mi", posed.rest_rotations[part], unit * posed.rest_radii[part])
    canonical = posed.rest_centres[part] + rest_offset
    return SurfaceSamples(points=points, normals=normals, canonical=canonical, local=unit, part=part)


def cast_backdrop(origin: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Far hit of rays from inside the backdrop cylinder: (distance (N,), surface uv in metres (N, 2), normals)."""
    a = directions[:, 0] ** 2 + directions[:, 2] ** 2
    half_b = directions[:, 0] * origin[0] + directions[:, 2] * origin[2]
    c = origin[0] ** 2 + origin[2] ** 2 - BACKDROP_RADIUS**2  # < 0: the origin is inside
    distance = (-half_b + np.sqrt(half_b * half_b - a * c)) / a
    points = origin + directions * distance[:, None]
    angle = np.arctan2(points[:, 0], -points[:, 2])  # 0 straight behind the head, seam behind the rig
    uv = np.stack([BACKDROP_RADIUS * angle, points[:, 1]], axis=1)
    normals = -points * np.array([1.0, 0.0, 1.0]) / BACKDROP_RADIUS
    return distance, uv, normals


# --- appearance -----------------------------------------------------------------------------------------------


def lambert(normals: np.ndarray) -> np.ndarray:
    """Ambient plus two directional lights, (N,) shading factors; no shadows, so plates match the video."""
    key = np.clip(normals @ LIGHT_KEY, 0.0, None)
    fill = np.clip(normals @ LIGHT_FILL, 0.0, None)
    return AMBIENT + KEY * key + FILL * fill


def _band(x: np.ndarray, low: float, high: float, soft: float) -> np.ndarray:
    return tex.smoothstep(low - soft, low + soft, x) * (1.0 - tex.smoothstep(high - soft, high + soft, x))


def _paint_face_features(colour: np.ndarray, canonical: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Lips, mouth interior and brows drawn in head-frame coordinates onto the skin."""
    x, y, z = canonical[:, 0], canonical[:, 1], canonical[:, 2]
    front = tex.smoothstep(0.045, 0.06, z)
    lip_width = 1.0 - tex.smoothstep(0.020, 0.027, np.abs(x))
    on_face, on_jaw = part == PART_INDEX["face"], part == PART_INDEX["jaw"]
    upper_lip = on_face * _band(y, -0.056, -0.046, 0.002) * lip_width * front
    lower_lip = on_jaw * _band(y, -0.068, -0.055, 0.002) * lip_width * front
    mouth = on_face * (1.0 - tex.smoothstep(-0.060, -0.056, y)) * lip_width * front  # shown when the jaw drops
    brow_width = tex.smoothstep(0.010, 0.016, np.abs(x)) * (1.0 - tex.smoothstep(0.046, 0.054, np.abs(x)))
    brows = np.isin(part, (PART_INDEX["face"], PART_INDEX["cranium"])) * _band(y, 0.044, 0.053, 0.0015) * brow_width
    colour = tex.mix(colour, tex.LIP, 0.85 * np.maximum(upper_lip, lower_lip))
    colour = tex.mix(colour, np.array([0.18, 0.05, 0.06]), mouth)
    return tex.mix(colour, tex.BROW, 0.9 * brows * front)


def _hair_weight(tables: tex.NoiseTables, canonical: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Hair cover on the cranium: the hairline is high at the forehead and drops towards the nape."""
    y, z = canonical[:, 1], canonical[:, 2]
    wobble = 0.012 * (tex.value_noise_3d(tables, canonical / 0.015) - 0.5)
    hairline = 0.018 + 0.047 * np.clip(z / 0.09, -1.0, 1.0) + wobble
    return (part == PART_INDEX["cranium"]) * tex.smoothstep(hairline - 0.003, hairline + 0.003, y)


def subject_albedo(tables: tex.NoiseTables, samples: SurfaceSamples) -> np.ndarray:
    """(M, 3) surface colour before shading: skin with features and hair, eyes, and a patterned shirt."""
    colour = np.empty_like(samples.canonical)
    eyes = np.isin(samples.part, EYES)
    torso = samples.part == PART_INDEX["torso"]
    skin = ~(eyes | torso)
    colour[skin] = _skin_and_hair(tables, samples.canonical[skin], samples.part[skin])
    colour[eyes] = tex.eye_colour(samples.local[eyes])
    colour[torso] = shirt_colour(tables, samples.canonical[torso])
    return colour


def _skin_and_hair(tables: tex.NoiseTables, canonical: np.ndarray, part: np.ndarray) -> np.ndarray:
    colour = _paint_face_features(tex.skin_colour(tables, canonical), canonical, part)
    hair = _hair_weight(tables, canonical, part)
    hairy = hair > 0
    colour[hairy] = tex.mix(colour[hairy], tex.hair_colour(tables, canonical[hairy]), hair[hairy])
    return colour


def shirt_colour(tables: tex.NoiseTables, points: np.ndarray) -> np.ndarray:
    """A dark red knit: stripes plus noise, so the torso is textured too."""
    stripes = 0.5 + 0.5 * np.sin(points[:, 1] * 2.0 * np.pi / 0.018)
    grain = tex.fbm_3d(tables, points + 911.0, wavelength=0.02, octaves=2)
    base = np.array([0.55, 0.14, 0.16]) * (0.75 + 0.25 * stripes + 0.3 * (grain - 0.5))[:, None]
    return base


def to_uint8(colour: np.ndarray) -> np.ndarray:
    return np.round(np.clip(colour, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass(frozen=True)
class Scene:
    """Everything a seed fixes: the subject's and the backdrop's noise tables and the motion phases."""

    skin_tables: tex.NoiseTables
    backdrop_tables: tex.NoiseTables
    motion: Motion


@lru_cache(maxsize=8)
def scene_for_seed(seed: int) -> Scene:
    return Scene(
        skin_tables=tex.NoiseTables.from_seed(2 * seed + 11),
        backdrop_tables=tex.NoiseTables.from_seed(2 * seed + 12),
        motion=Motion.from_seed(seed),
    )
