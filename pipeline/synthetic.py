"""A synthetic NeRSemble-style rig: writes a complete raw capture with exact ground truth.

Every stage and test needs real input, and a renderer we control gives it plus what no real capture has:
exact per-pixel alpha and z-depth. The subject (a textured bust whose head turns, nods, opens its jaw and
puffs its cheeks) and the backdrop are analytic (:mod:`pipeline.synthetic_scene`), so the ground truth is
exact for each pixel-centre ray and any camera at any time can be rendered later for novel-view checks.

Conventions
- World frame: metres, origin at the resting head's centre, y up, +z out of the face (towards the frontal
  cameras), +x the subject's left. Cameras use OpenCV axes, as everywhere in the pipeline.
- Time: ``t`` is normalised sequence time in [0, 1]; frame ``i`` of ``T`` is ``t = i / (T - 1)``
  (:func:`frame_times`), so a 3-frame capture spans the same motion as a 24-frame one.
- Rig: 16 cameras on an arc of radius 1 m, two rows of 8 columns; column 1 is at -x (azimuth -56 deg) and
  column 8 at +x; the upper row sits 10 cm above the head's centre, the lower row 24 cm below, looking up.
- Other rigs (:func:`rig_layout`): any camera count on the same frontal arc (``nersemble``) or on a 360-degree
  ring at several heights (``ring``), with serials made from a format such as ``"{:02d}"``; the capture may
  come without background plates, so every stage meets what a capture from another studio looks like.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import zarr

from pipeline import synthetic_scene as scene_lib
from pipeline import synthetic_texture as tex
from stages.core.cameras import CameraParams, look_at, pixel_centers, pixel_rays, write_camera_params
from stages.core.errors import CaptureLayoutError
from stages.core.video import encode_video

SERIALS: list[str] = [
    "222200042", "222200044", "222200046", "222200040", "222200036", "222200048", "220700191", "222200041",
    "222200037", "222200038", "222200047", "222200043", "222200049", "222200039", "222200045", "221501007",
]
UPPER_ROW = ["222200042", "222200046", "222200036", "220700191", "222200037", "222200047", "222200049", "221501007"]
LOWER_ROW = ["222200044", "222200040", "222200048", "222200041", "222200038", "222200043", "222200039", "222200045"]

RIG_RADIUS = 1.0  # metres, horizontal distance from the head's centre
ROW_HEIGHTS = {"upper": 0.10, "lower": -0.24}
AZIMUTH_SPAN_DEG = 56.0  # the outer columns' azimuth; columns are evenly spaced in between
FOCAL_PER_HEIGHT = 2.5  # focal length in pixels per pixel of frame height: the head fills about 60%
FOCAL_JITTER = 0.04  # per-camera relative focal length spread
PRINCIPAL_JITTER = 0.01  # per-camera principal point offset, as a fraction of the frame size
AIM_POINT = np.array([0.0, -0.04, 0.0])  # a little below the head's centre, so the neck and shoulders show
AIM_JITTER = 0.01  # metres: cameras aim near, not exactly at, the aim point
JPEG_QUALITY = 95
LAYOUTS = ("nersemble", "ring")
MAX_CAMERAS = 64
RING_HEIGHTS = (0.30, -0.30)  # metres: the highest and lowest ring row, so the top and the chin both show
DEFAULT_SERIAL_FORMAT = "{:02d}"  # serials of generated rigs: "00", "01", ... as small studios number cameras


# --- the rig ----------------------------------------------------------------------------------------------


def camera_slot(serial: str) -> tuple[str, int]:
    """(row, column) of a serial in the rig, columns 0..7 left to right as in the data doc's figure."""
    for row, members in (("upper", UPPER_ROW), ("lower", LOWER_ROW)):
        if serial in members:
            return row, members.index(serial)
    raise CaptureLayoutError(f"camera {serial!r} is not one of the rig's 16 serials")


def camera_position(serial: str) -> np.ndarray:
    """World position of a camera on the rig's arc."""
    row, column = camera_slot(serial)
    azimuth = np.radians(np.linspace(-AZIMUTH_SPAN_DEG, AZIMUTH_SPAN_DEG, len(UPPER_ROW))[column])
    return np.array([RIG_RADIUS * np.sin(azimuth), ROW_HEIGHTS[row], RIG_RADIUS * np.cos(azimuth)])


def _rig_jitter(seed: int) -> dict[str, np.ndarray]:
    """Per-camera deviations, drawn once per seed for all 16 so a subset gets the same values as the full rig."""
    rng = np.random.default_rng([seed, 0])
    return {
        "focal": rng.uniform(-FOCAL_JITTER, FOCAL_JITTER, len(SERIALS)),
        "principal": rng.uniform(-PRINCIPAL_JITTER, PRINCIPAL_JITTER, (len(SERIALS), 2)),
        "aim": rng.uniform(-AIM_JITTER, AIM_JITTER, (len(SERIALS), 3)),
    }


def rig_cameras(width: int, height: int, serials: Sequence[str] | None = None, seed: int = 0) -> CameraParams:
    """Calibration of the synthetic rig for ``width`` x ``height`` frames (world_2_cam + K per serial)."""
    serials = list(SERIALS if serials is None else serials)
    jitter = _rig_jitter(seed)
    world_2_cam, intrinsics = {}, {}
    for serial in serials:
        camera_slot(serial)  # rejects unknown serials with a clear message
        index = SERIALS.index(serial)
        focal = FOCAL_PER_HEIGHT * height * (1.0 + jitter["focal"][index])
        cx, cy = np.array([width, height]) * (0.5 + jitter["principal"][index])
        intrinsics[serial] = np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])
        world_2_cam[serial] = look_at(camera_position(serial), AIM_POINT + jitter["aim"][index])
    return CameraParams(world_2_cam=world_2_cam, intrinsics=intrinsics, shared_intrinsics=False)


def select_serials(cameras: int | Sequence[str]) -> list[str]:
    """A camera count picks serials spread evenly over SERIALS (so small rigs still span the arc)."""
    if isinstance(cameras, int):
        if not 1 <= cameras <= len(SERIALS):
            raise ValueError(f"cameras must be between 1 and {len(SERIALS)}, got {cameras}")
        picks = np.round(np.linspace(0, len(SERIALS) - 1, cameras)).astype(int)
        return [SERIALS[i] for i in picks]
    serials = [str(serial) for serial in cameras]
    for serial in serials:
        camera_slot(serial)
    if len(set(serials)) != len(serials) or not serials:
        raise ValueError(f"cameras must be a non-empty list of distinct serials, got {serials}")
    return serials


# --- other rigs -------------------------------------------------------------------------------------------------


def _split_rows(count: int, rows: int) -> list[int]:
    """Cameras per row, as even as possible, the extra ones in the first rows."""
    if not 1 <= rows <= count:
        raise ValueError(f"rows must be between 1 and the camera count {count}, got {rows}")
    return [count // rows + (1 if r < count % rows else 0) for r in range(rows)]


def arc_positions(count: int, rows: int = 2) -> list[np.ndarray]:
    """The NeRSemble frontal arc with ``count`` cameras: columns left to right, each column top to bottom."""
    _split_rows(count, rows)
    heights = [ROW_HEIGHTS["upper"], ROW_HEIGHTS["lower"]] if rows == 2 else \
        list(np.linspace(ROW_HEIGHTS["upper"], ROW_HEIGHTS["lower"], rows)) if rows > 1 else [0.0]
    columns = -(-count // rows)
    azimuths = np.radians(np.linspace(-AZIMUTH_SPAN_DEG, AZIMUTH_SPAN_DEG, columns) if columns > 1 else [0.0])
    slots = [(a, h) for a in azimuths for h in heights][:count]
    return [np.array([RIG_RADIUS * np.sin(a), h, RIG_RADIUS * np.cos(a)]) for a, h in slots]


def ring_positions(count: int, rows: int = 3) -> list[np.ndarray]:
    """``count`` cameras all around the head (360 degrees) in ``rows`` rings, top ring first.

    Azimuth 0 is straight in front of the face; neighbouring rings are turned by half a step against each other,
    so every azimuth gap of one ring is covered by the next.
    """
    per_row = _split_rows(count, rows)
    heights = np.linspace(*RING_HEIGHTS, rows) if rows > 1 else [0.0]
    positions = []
    for row, (n, height) in enumerate(zip(per_row, heights)):
        for k in range(n):
            azimuth = 2.0 * np.pi * (k + 0.5 * (row % 2)) / n
            positions.append(np.array([RIG_RADIUS * np.sin(azimuth), height, RIG_RADIUS * np.cos(azimuth)]))
    return positions


def generated_serials(count: int, serial_format: str = DEFAULT_SERIAL_FORMAT) -> list[str]:
    """``count`` distinct serials from a format applied to 0, 1, ... (``"{:02d}"`` gives "00", "01", ...)."""
    try:
        serials = [serial_format.format(i) for i in range(count)]
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(f"serial format {serial_format!r} cannot format a camera number: {error}") from None
    bad = [s for s in serials if not s or any(ch in s for ch in "/\\ ")]
    if len(set(serials)) != count or bad:
        raise ValueError(f"serial format {serial_format!r} must give {count} distinct serials usable in file "
                         f"names, got {serials[:4]}...")
    return serials


def rig_layout(cameras: int | Sequence[str], layout: str = "nersemble", rows: int | None = None,
               serial_format: str | None = None) -> dict[str, np.ndarray] | None:
    """serial -> camera position for a generated rig; None for the real NeRSemble serials on their arc.

    ``cameras`` is a count (serials from ``serial_format``) or the serials themselves; ``rows`` is the number
    of camera rows (default: 2 on the arc, 3 rings).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layout == "nersemble" and serial_format is None and rows in (None, 2) and (
            not isinstance(cameras, int) or cameras <= len(SERIALS)) and (
            isinstance(cameras, int) or all(str(c) in SERIALS for c in cameras)):
        return None
    if isinstance(cameras, int):
        serials = generated_serials(cameras, serial_format or DEFAULT_SERIAL_FORMAT)
    else:
        serials = [str(c) for c in cameras]
        if not serials or len(set(serials)) != len(serials):
            raise ValueError(f"cameras must be a non-empty list of distinct serials, got {serials}")
    if not 1 <= len(serials) <= MAX_CAMERAS:
        raise ValueError(f"cameras must be between 1 and {MAX_CAMERAS}, got {len(serials)}")
    place = arc_positions if layout == "nersemble" else ring_positions
    positions = place(len(serials), rows or (2 if layout == "nersemble" else 3))
    return dict(zip(serials, positions))


def layout_cameras(positions: dict[str, np.ndarray], width: int, height: int, seed: int = 0) -> CameraParams:
    """Calibration of a generated rig: the arc's lens and aim jitter, drawn per camera in layout order."""
    rng = np.random.default_rng([seed, 0, len(positions)])
    count = len(positions)
    focal_jitter = rng.uniform(-FOCAL_JITTER, FOCAL_JITTER, count)
    principal = rng.uniform(-PRINCIPAL_JITTER, PRINCIPAL_JITTER, (count, 2))
    aim = rng.uniform(-AIM_JITTER, AIM_JITTER, (count, 3))
    world_2_cam, intrinsics = {}, {}
    for index, (serial, position) in enumerate(positions.items()):
        focal = FOCAL_PER_HEIGHT * height * (1.0 + focal_jitter[index])
        cx, cy = np.array([width, height]) * (0.5 + principal[index])
        intrinsics[serial] = np.array([[focal, 0.0, cx], [0.0, focal, cy], [0.0, 0.0, 1.0]])
        world_2_cam[serial] = look_at(position, AIM_POINT + aim[index])
    return CameraParams(world_2_cam=world_2_cam, intrinsics=intrinsics, shared_intrinsics=False)


def frame_times(frames: int) -> np.ndarray:
    """Normalised time of each frame: evenly over [0, 1], a single frame at 0."""
    return np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(frames)


def looped_frames(frames: int, distinct: int) -> np.ndarray:
    """Which of ``distinct`` poses each of ``frames`` frames shows, going back and forth (0, 1, .., d-1, d-2, ..,
    1, 0, 1, ..) so the motion stays continuous: a long capture for cost benchmarks at a fraction of the
    rendering, whose per-frame cost does not depend on the pose."""
    if distinct < 2 or distinct >= frames:
        return np.arange(frames)
    period = 2 * (distinct - 1)
    phase = np.arange(frames) % period
    return np.where(phase < distinct, phase, period - phase)


# --- rendering --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderResult:
    """One camera at one time. ``depth`` is the subject's z-depth in metres, 0 on the backdrop."""

    rgb: np.ndarray  # (H, W, 3) uint8, subject over backdrop
    alpha: np.ndarray  # (H, W) uint8, 0 or 255 (pixel-centre coverage)
    depth: np.ndarray  # (H, W) float32
    background: np.ndarray  # (H, W, 3) uint8, the backdrop alone: equals rgb wherever alpha == 0


@dataclass(frozen=True)
class CameraRays:
    """The pixel-centre rays of one camera: computed once and reused for its plate and every frame."""

    origin: np.ndarray  # (3,) camera centre, world
    directions: np.ndarray  # (N, 3) unit, world
    z_per_distance: np.ndarray  # (N,) camera-z per unit distance along each ray: distance -> z-depth
    width: int
    height: int


def _rays(camera_K: np.ndarray, world_2_cam: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One origin, (N, 3) unit directions and (N,) camera-z of each direction, for (..., 2) pixel coordinates."""
    origins, directions, z_per_distance = pixel_rays(camera_K, world_2_cam, np.reshape(uv, (-1, 2)))
    return origins[0], directions, z_per_distance


def camera_rays(camera_K: np.ndarray, world_2_cam: np.ndarray, width: int, height: int) -> CameraRays:
    origin, directions, z_per_distance = _rays(camera_K, world_2_cam, pixel_centers(width, height))
    return CameraRays(origin, directions, z_per_distance, width, height)


def subject_surface_points(camera_K: np.ndarray, world_2_cam: np.ndarray, uv: np.ndarray, t: float,
                           *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Where the rays through pixel coordinates ``uv`` (..., 2) first meet the subject at time ``t``.

    Returns world points (..., 3), NaN where the ray misses the subject, and z-depth (...), 0 there; at pixel
    centres this is exactly what :func:`render_subject` writes, at any other ``uv`` it is the exact answer
    that a projected point can be checked against.
    """
    uv = np.asarray(uv, dtype=np.float64)
    origin, directions, z_per_distance = _rays(camera_K, world_2_cam, uv)
    posed = scene_lib.pose_parts(scene_lib.scene_for_seed(seed).motion, t)
    hits = scene_lib.cast_subject(posed, origin, directions)
    found = np.isfinite(hits.distance)
    points = np.where(found[:, None], origin + directions * np.where(found, hits.distance, 0.0)[:, None], np.nan)
    depth = np.where(found, hits.distance * z_per_distance, 0.0)
    return points.reshape(uv.shape[:-1] + (3,)), depth.reshape(uv.shape[:-1])


def render_background(camera_K: np.ndarray, world_2_cam: np.ndarray, width: int, height: int,
                      *, seed: int = 0) -> np.ndarray:
    """The backdrop without the subject, (H, W, 3) uint8: the camera's background plate."""
    return _backdrop_image(camera_rays(camera_K, world_2_cam, width, height), seed)


def _backdrop_image(rays: CameraRays, seed: int) -> np.ndarray:
    _, uv, normals = scene_lib.cast_backdrop(rays.origin, rays.directions)
    scene = scene_lib.scene_for_seed(seed)
    colour = tex.backdrop_colour(scene.backdrop_tables, uv) * scene_lib.lambert(normals)[:, None]
    return scene_lib.to_uint8(colour).reshape(rays.height, rays.width, 3)


def render_subject(camera_K: np.ndarray, world_2_cam: np.ndarray, width: int, height: int, t: float,
                   *, seed: int = 0, background: np.ndarray | None = None) -> RenderResult:
    """Render the subject over the backdrop from any camera at normalised time ``t``.

    Pass the camera's ``background`` (from :func:`render_background`) to skip re-rendering the static
    backdrop when rendering many frames of one camera.
    """
    rays = camera_rays(camera_K, world_2_cam, width, height)
    return _render_frame(rays, t, seed, _backdrop_image(rays, seed) if background is None else background)


def _render_frame(rays: CameraRays, t: float, seed: int, background: np.ndarray) -> RenderResult:
    """Shade the subject's nearest hits over the plate; alpha and depth come from the same pixel-centre rays."""
    scene = scene_lib.scene_for_seed(seed)
    posed = scene_lib.pose_parts(scene.motion, t)
    hits = scene_lib.cast_subject(posed, rays.origin, rays.directions)
    samples = scene_lib.surface_samples(posed, rays.origin, rays.directions, hits)
    shaded = scene_lib.subject_albedo(scene.skin_tables, samples) * scene_lib.lambert(samples.normals)[:, None]

    found = np.isfinite(hits.distance)
    rgb = background.reshape(-1, 3).copy()
    rgb[found] = scene_lib.to_uint8(shaded)
    depth = np.where(found, hits.distance * rays.z_per_distance, 0.0).astype(np.float32)
    shape = (rays.height, rays.width)
    return RenderResult(
        rgb=rgb.reshape(shape + (3,)),
        alpha=np.where(found, 255, 0).astype(np.uint8).reshape(shape),
        depth=depth.reshape(shape),
        background=background,
    )


# --- the capture on disk ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticCapture:
    """Where a synthesized capture lives (NeRSemble v2 layout) and what it holds."""

    root: Path
    participant_dir: Path
    sequence_dir: Path
    calibration_path: Path
    video_paths: dict[str, Path]
    background_paths: dict[str, Path]
    ground_truth_uri: str
    cameras: list[str]  # sorted serials: the ground truth's camera axis order
    frames: int
    width: int
    height: int
    fps: float
    seed: int
    frame_times: list[float] = field(default_factory=list)
    layout: str = "nersemble"
    plates: bool = True  # False: no BACKGROUND folder was written


def _capture_paths(out_root: Path, participant: str, sequence: str, serials: list[str]) -> SyntheticCapture:
    participant_dir = out_root / participant
    sequence_dir = participant_dir / "sequences" / sequence
    backgrounds = participant_dir / "sequences" / "BACKGROUND"
    return SyntheticCapture(
        root=out_root,
        participant_dir=participant_dir,
        sequence_dir=sequence_dir,
        calibration_path=participant_dir / "calibration" / "camera_params.json",
        video_paths={s: sequence_dir / "images" / f"cam_{s}.mp4" for s in serials},
        background_paths={s: backgrounds / f"image_{s}.jpg" for s in serials},
        ground_truth_uri=str(sequence_dir / "ground_truth.zarr"),
        cameras=sorted(serials),
        frames=0, width=0, height=0, fps=0.0, seed=0,
    )


def _create_ground_truth(uri: str, cameras: list[str], times: np.ndarray, width: int, height: int,
                         fps: float, seed: int) -> zarr.Group:
    """Empty ground-truth store: one chunk per (camera, frame), so each camera is written independently."""
    group = zarr.open_group(uri, mode="w", zarr_format=3)
    shape, chunks = (len(cameras), len(times), height, width), (1, 1, height, width)
    group.create_array("alpha", shape=shape, chunks=chunks, dtype="uint8", fill_value=0,
                       dimension_names=("camera", "frame", "y", "x"))
    group.create_array("depth", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0,
                       dimension_names=("camera", "frame", "y", "x"))
    group.attrs.update({
        "cameras": cameras,
        "frame_times": [float(t) for t in times],
        "fps": float(fps),
        "seed": int(seed),
        "depth": "z-depth of the subject along the camera's optical axis, metres; 0 = background",
        "alpha": "0/255 coverage of the pixel-centre ray",
        "world_frame": "metres, origin at the resting head's centre, y up, +z out of the face",
    })
    return group


def _write_plate(path: Path, plate: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(plate[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise CaptureLayoutError(f"{path}: could not write the background plate")


def _render_camera(params: CameraParams, serial: str, width: int, height: int, times: np.ndarray,
                   seed: int) -> tuple[np.ndarray, list[RenderResult]]:
    """The plate and every frame of one camera."""
    rays = camera_rays(params.intrinsics[serial], params.world_2_cam[serial], width, height)
    plate = _backdrop_image(rays, seed)
    return plate, [_render_frame(rays, float(t), seed, plate) for t in times]


def _check_size(width: int, height: int, frames: int) -> None:
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"frame size must be positive and even (H.264 yuv420p), got {width}x{height}")
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")


def synthesize_capture(out_root: str | Path, *, participant: str = "001", sequence: str = "EXP-1-head",
                       cameras: int | Sequence[str] = 16, frames: int = 24, width: int = 220, height: int = 320,
                       fps: float = 73.0, seed: int = 0, crf: int = 18, layout: str = "nersemble",
                       rows: int | None = None, serial_format: str | None = None,
                       plates: bool = True, distinct_frames: int | None = None) -> SyntheticCapture:
    """Write a raw capture in the NeRSemble v2 layout plus ``ground_truth.zarr``; returns its paths.

    ``layout``, ``rows`` and ``serial_format`` make another rig (:func:`rig_layout`); the defaults give the
    NeRSemble rig with its real serials. ``plates=False`` writes no background plates. ``distinct_frames``
    renders only that many poses and loops them (:func:`looped_frames`), for captures too long to render.
    Cameras are rendered one after another while the previous camera's video encodes in a worker thread
    (ffmpeg runs in its own process), which keeps both CPU cores busy.
    """
    _check_size(width, height, frames)
    positions = rig_layout(cameras, layout, rows, serial_format)
    if positions is None:
        serials = select_serials(cameras)
        params = rig_cameras(width, height, serials, seed=seed)
    else:
        serials = list(positions)
        params = layout_cameras(positions, width, height, seed=seed)
    poses = looped_frames(frames, distinct_frames or frames)
    pose_times = frame_times(int(poses.max()) + 1)
    times = pose_times[poses]
    paths = _capture_paths(Path(out_root), participant, sequence, serials)
    if not plates:
        paths = replace(paths, background_paths={})
    paths.calibration_path.parent.mkdir(parents=True, exist_ok=True)
    write_camera_params(paths.calibration_path, params)
    for video in paths.video_paths.values():
        video.parent.mkdir(parents=True, exist_ok=True)

    truth = _create_ground_truth(paths.ground_truth_uri, paths.cameras, times, width, height, fps, seed)
    with ThreadPoolExecutor(max_workers=1) as encoder:
        pending: Future | None = None
        for index, serial in enumerate(paths.cameras):
            plate, distinct = _render_camera(params, serial, width, height, pose_times, seed)
            renders = [distinct[pose] for pose in poses]
            if plates:
                _write_plate(paths.background_paths[serial], plate)
            truth["alpha"][index] = np.stack([r.alpha for r in renders])
            truth["depth"][index] = np.stack([r.depth for r in renders])
            if pending is not None:
                pending.result()  # at most one camera's frames wait in memory
            pending = encoder.submit(encode_video, paths.video_paths[serial], [r.rgb for r in renders], fps, crf)
        if pending is not None:
            pending.result()

    return replace(paths, frames=frames, width=width, height=height, fps=fps, seed=seed,
                   frame_times=[float(t) for t in times], layout=layout, plates=plates)
