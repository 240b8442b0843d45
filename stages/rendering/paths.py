"""Camera paths for rendering: turntables, smooth paths through rig cameras, and hand-written keyframe files.

Everything here is plain numpy on the pipeline's camera convention (metric OpenCV ``world_2_cam``, ``K`` for
the render size), so a path can be built, checked and written before a model is ever loaded. Time is
upstream's normalised sequence time in [0, 1]; a frame at time ``t`` shows timestep ``round(t (T - 1))``.

Our calibrations keep their own world frame (the official trajectory assumes NeRSemble's aligned, z-up one),
so a turntable is placed relative to the rig: centred on its focus point, around its mean up direction,
starting from its mean viewing direction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.core.cameras import camera_center, look_at, quaternion_to_rotation, rotation_to_quaternion
from stages.core.errors import PipelineError

OFFICIAL_CONE_DEG = math.degrees(math.atan(0.3))  # upstream: a 0.3 m circle 1 m in front of the face (16.7 deg)
PATH_FORMAT = "nersemble-pipeline camera path v1"


class CameraPathError(PipelineError):
    """A camera path file that cannot be used; the message names the file, the keyframe and the field."""


@dataclass(frozen=True)
class CameraView:
    """One rendered frame's camera: ``K`` for ``width`` x ``height`` frames, metric OpenCV pose, sequence time."""

    K: np.ndarray
    world_2_cam: np.ndarray
    width: int
    height: int
    time: float

    def timestep(self, n_timesteps: int) -> int:
        return timestep_for(self.time, n_timesteps)


def timestep_for(time: float, n_timesteps: int) -> int:
    """Upstream's nearest timestep for a normalised time: ``round(t (T - 1))``, clamped to the sequence."""
    return int(min(max(round(float(time) * (n_timesteps - 1)), 0), n_timesteps - 1))


def frame_times(frames: int) -> np.ndarray:
    """``frames`` times spreading the whole sequence over the video: 0, 1/(N-1), ..., 1 (upstream's ``arange/(N-1)``)."""
    return np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(max(frames, 0))


# --- the rig's own frame -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RigFrame:
    """Where the rig looks, seen from the subject: an orthonormal (front, side, up) basis at ``centre`` (metres)."""

    centre: np.ndarray
    up: np.ndarray
    front: np.ndarray  # from the centre towards the rig's mean camera position, orthogonal to ``up``
    side: np.ndarray  # up x front
    distance: float  # mean camera distance from the centre
    elevation_deg: float  # mean camera elevation above the plane orthogonal to ``up``


def rig_frame(world_2_cams: Sequence[np.ndarray], centre: np.ndarray) -> RigFrame:
    """The rig's mean up (minus each camera's y axis), mean viewing direction, distance and elevation."""
    poses = np.asarray(world_2_cams, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[0] == 0:
        raise PipelineError("a camera path needs at least one calibrated camera")
    centre = np.asarray(centre, dtype=np.float64)
    up = -poses[:, 1, :3].mean(axis=0)  # row 1 of R: the camera's y axis (down) in world coordinates
    up /= np.linalg.norm(up)
    offsets = camera_center(poses) - centre
    distances = np.linalg.norm(offsets, axis=1)
    directions = offsets / distances[:, None]
    front = directions.mean(axis=0)
    front -= up * float(front @ up)
    if np.linalg.norm(front) < 1e-6:  # cameras all around the subject: any horizontal direction will do
        front = np.cross(up, [1.0, 0.0, 0.0] if abs(up[0]) < 0.9 else [0.0, 0.0, 1.0])
    front /= np.linalg.norm(front)
    elevation = float(np.degrees(np.arcsin(np.clip(directions @ up, -1, 1))).mean())
    return RigFrame(centre=centre, up=up, front=front, side=np.cross(up, front), distance=float(distances.mean()),
                    elevation_deg=elevation)


def render_intrinsics(intrinsics: Sequence[np.ndarray], from_size: tuple[int, int],
                      to_size: tuple[int, int]) -> np.ndarray:
    """A centred K with the rig's median focal lengths, rescaled from the stored to the render size."""
    Ks = np.asarray(intrinsics, dtype=np.float64)
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return np.array([[float(np.median(Ks[:, 0, 0])) * sx, 0.0, to_size[0] / 2],
                     [0.0, float(np.median(Ks[:, 1, 1])) * sy, to_size[1] / 2],
                     [0.0, 0.0, 1.0]])


def turntable_path(rig: RigFrame, K: np.ndarray, width: int, height: int, frames: int, *,
                   radius: float | None = None, elevation_deg: float = 0.0,
                   trajectory: Literal["orbit", "official"] = "orbit", arc_deg: float = 360.0) -> list[CameraView]:
    """Cameras circling the subject while time plays 0 -> 1.

    ``orbit``: around the rig's up axis at the rig's mean elevation plus ``elevation_deg``, starting in front;
    ``arc_deg`` < 360 sways back and forth across the front instead of going all the way round (the back of a
    head is never seen by a frontal rig). ``official``: upstream's trajectory, a circle around the frontal axis
    at 16.7 deg off-frontal, starting below the face, one turn over the video.
    """
    radius = rig.distance if radius is None else float(radius)
    elevation = math.radians(rig.elevation_deg + elevation_deg)
    tilted_front = math.cos(elevation) * rig.front + math.sin(elevation) * rig.up
    tilted_up = -math.sin(elevation) * rig.front + math.cos(elevation) * rig.up
    views = []
    for index, time in enumerate(frame_times(frames)):
        phase = 2 * math.pi * index / max(frames, 1)
        if trajectory == "official":
            cone = math.radians(OFFICIAL_CONE_DEG)
            ring = -math.cos(phase) * tilted_up + math.sin(phase) * rig.side
            direction, up = math.cos(cone) * tilted_front + math.sin(cone) * ring, tilted_up
        else:  # constant elevation: a turntable
            azimuth = phase if arc_deg >= 360 else math.radians(arc_deg) / 2 * math.sin(phase)
            horizontal = math.cos(azimuth) * rig.front + math.sin(azimuth) * rig.side
            direction, up = math.cos(elevation) * horizontal + math.sin(elevation) * rig.up, rig.up
        eye = rig.centre + radius * direction
        views.append(CameraView(K=np.asarray(K, dtype=np.float64), world_2_cam=look_at(eye, rig.centre, up),
                                width=width, height=height, time=float(time)))
    return views


# --- keyframes and smooth interpolation ----------------------------------------------------------------------


@dataclass(frozen=True)
class CameraPath:
    """Keyframes (``CameraView``; all share the path's size) and how many frames to render between them.

    ``keyframe_frames`` pins keyframe i to output frame ``keyframe_frames[i]`` (pacing); without it, keyframes
    are spread evenly over ``frames`` (or the stage's seconds x fps when that is None too).
    """

    keyframes: list[CameraView]
    width: int
    height: int
    frames: int | None = None
    keyframe_frames: list[int] | None = None
    fps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def frame_count(self, default: int) -> int:
        if self.keyframe_frames:
            return self.keyframe_frames[-1] + 1
        return self.frames if self.frames is not None else default


def _catmull_rom(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, s: float) -> np.ndarray:
    """Uniform Catmull-Rom between p1 and p2: passes through every keyframe with a continuous velocity."""
    return 0.5 * ((2 * p1) + (-p0 + p2) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s * s
                  + (-p0 + 3 * p1 - 3 * p2 + p3) * s ** 3)


def _slerp(q0: np.ndarray, q1: np.ndarray, s: float) -> np.ndarray:
    if float(q0 @ q1) < 0:
        q1 = -q1
    dot = min(float(q0 @ q1), 1.0)
    if dot > 0.9995:
        q = q0 + s * (q1 - q0)
        return q / np.linalg.norm(q)
    angle = math.acos(dot)
    return (math.sin((1 - s) * angle) * q0 + math.sin(s * angle) * q1) / math.sin(angle)


def interpolate_path(keyframes: Sequence[CameraView], frames: int,
                     keyframe_frames: Sequence[int] | None = None) -> list[CameraView]:
    """``frames`` views through the keyframes: centres on a Catmull-Rom spline, rotations by slerp, K and time linear."""
    if not keyframes:
        raise PipelineError("a camera path needs at least one keyframe")
    if frames < 1:
        raise PipelineError(f"a camera path needs at least one frame, got {frames}")
    n = len(keyframes)
    anchors = (np.asarray(keyframe_frames, dtype=np.float64) if keyframe_frames is not None
               else np.linspace(0, frames - 1, n) if n > 1 else np.zeros(1))
    centres = np.array([camera_center(k.world_2_cam) for k in keyframes])
    quats = [rotation_to_quaternion(np.asarray(k.world_2_cam)[:3, :3]) for k in keyframes]
    views = []
    for frame in range(frames):
        if n == 1:
            segment, s = 0, 0.0
        else:
            segment = int(np.clip(np.searchsorted(anchors, frame, side="right") - 1, 0, n - 2))
            span = anchors[segment + 1] - anchors[segment]
            s = float(np.clip((frame - anchors[segment]) / span, 0.0, 1.0)) if span > 0 else 0.0
        a, b = keyframes[segment], keyframes[min(segment + 1, n - 1)]
        i0, i1, i2, i3 = max(segment - 1, 0), segment, min(segment + 1, n - 1), min(segment + 2, n - 1)
        centre = _catmull_rom(centres[i0], centres[i1], centres[i2], centres[i3], s)
        rotation = quaternion_to_rotation(_slerp(quats[i1], quats[i2], s))
        world_2_cam = np.eye(4)
        world_2_cam[:3, :3] = rotation
        world_2_cam[:3, 3] = -rotation @ centre
        views.append(CameraView(K=(1 - s) * np.asarray(a.K) + s * np.asarray(b.K), world_2_cam=world_2_cam,
                                width=a.width, height=a.height, time=(1 - s) * a.time + s * b.time))
    return views


def expand_path(path: CameraPath, default_frames: int) -> list[CameraView]:
    """Every frame of a keyframed path."""
    return interpolate_path(path.keyframes, path.frame_count(default_frames), path.keyframe_frames)


def rig_camera_path(serials: Sequence[str], intrinsics: dict[str, np.ndarray], world_2_cam: dict[str, np.ndarray],
                    stored_size: tuple[int, int], render_size: tuple[int, int]) -> CameraPath:
    """Keyframes at the chosen rig cameras, in the given order, time spread evenly from 0 to 1 across them."""
    missing = [s for s in serials if s not in world_2_cam or s not in intrinsics]
    if missing:
        raise PipelineError(f"path cameras {', '.join(missing)} are not calibrated cameras of this capture "
                            f"(cameras: {', '.join(sorted(world_2_cam))})")
    if not serials:
        raise PipelineError("a path through rig cameras needs at least one camera")
    times = frame_times(len(serials)) if len(serials) > 1 else np.zeros(1)
    sx, sy = render_size[0] / stored_size[0], render_size[1] / stored_size[1]
    keyframes = []
    for serial, time in zip(serials, times):
        K = np.asarray(intrinsics[serial], dtype=np.float64).copy()
        K[0] *= sx
        K[1] *= sy
        keyframes.append(CameraView(K=K, world_2_cam=np.asarray(world_2_cam[serial], dtype=np.float64),
                                    width=render_size[0], height=render_size[1], time=float(time)))
    return CameraPath(keyframes=keyframes, width=render_size[0], height=render_size[1])


# --- the camera path file ------------------------------------------------------------------------------------


def camera_path_json(path: CameraPath) -> dict[str, Any]:
    """The file's JSON object: size, optional frames/fps, keyframes of K, world_2_cam, time (and frame)."""
    keyframes = []
    for index, view in enumerate(path.keyframes):
        entry: dict[str, Any] = {"K": np.asarray(view.K).tolist(), "world_2_cam": np.asarray(view.world_2_cam).tolist(),
                                 "time": float(view.time)}
        if path.keyframe_frames is not None:
            entry["frame"] = int(path.keyframe_frames[index])
        keyframes.append(entry)
    data: dict[str, Any] = {"format": PATH_FORMAT, "width": path.width, "height": path.height}
    if path.frames is not None:
        data["frames"] = path.frames
    if path.fps is not None:
        data["fps"] = path.fps
    data.update(path.extra)
    data["keyframes"] = keyframes
    return data


def write_camera_path(file: str | Path, path: CameraPath) -> Path:
    file = Path(file)
    file.write_text(json.dumps(camera_path_json(path), indent=2) + "\n")
    return file


def _matrix(value: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CameraPathError(f"{where} is not a numeric {shape[0]}x{shape[1]} matrix") from None
    if matrix.shape != shape or not np.all(np.isfinite(matrix)):
        raise CameraPathError(f"{where} must be a finite {shape[0]}x{shape[1]} matrix, got shape {matrix.shape}")
    return matrix


def _positive_int(data: dict, key: str, where: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CameraPathError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def parse_camera_path(data: Any, source: str) -> CameraPath:
    """Validate a camera path object; every error names ``source``, the keyframe index and the field."""
    if not isinstance(data, dict):
        raise CameraPathError(f"{source}: expected a JSON object with 'width', 'height' and 'keyframes'")
    width, height = _positive_int(data, "width", source), _positive_int(data, "height", source)
    if width is None or height is None:
        raise CameraPathError(f"{source}: 'width' and 'height' (the frame size the keyframes' K are for) are required")
    frames = _positive_int(data, "frames", source)
    fps = data.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise CameraPathError(f"{source}: 'fps' must be a positive number, got {fps!r}")
    raw_keyframes = data.get("keyframes")
    if not isinstance(raw_keyframes, list) or not raw_keyframes:
        raise CameraPathError(f"{source}: 'keyframes' must be a non-empty list of {{K, world_2_cam, time}}")
    keyframes, pinned = [], []
    for index, entry in enumerate(raw_keyframes):
        where = f"{source}: keyframe {index}"
        if not isinstance(entry, dict):
            raise CameraPathError(f"{where}: expected an object with 'K', 'world_2_cam' and 'time'")
        for key in ("K", "world_2_cam", "time"):
            if key not in entry:
                raise CameraPathError(f"{where}: missing field '{key}'")
        K = _matrix(entry["K"], (3, 3), f"{where}: field 'K'")
        if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]):
            raise CameraPathError(f"{where}: field 'K' must have positive focal lengths and last row [0, 0, 1]")
        pose = _matrix(entry["world_2_cam"], (4, 4), f"{where}: field 'world_2_cam'")
        rotation = pose[:3, :3]
        if (not np.allclose(pose[3], [0, 0, 0, 1]) or not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4)
                or np.linalg.det(rotation) < 0):
            raise CameraPathError(f"{where}: field 'world_2_cam' is not a rigid transform (rotation + translation, "
                                  "last row [0, 0, 0, 1])")
        time = entry["time"]
        if isinstance(time, bool) or not isinstance(time, (int, float)) or not 0.0 <= float(time) <= 1.0:
            raise CameraPathError(f"{where}: field 'time' must be a number in [0, 1] (normalised sequence time), "
                                  f"got {time!r}")
        if "frame" in entry:
            frame = entry["frame"]
            if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
                raise CameraPathError(f"{where}: field 'frame' must be a non-negative integer, got {frame!r}")
            if pinned and frame <= pinned[-1]:
                raise CameraPathError(f"{where}: field 'frame' ({frame}) must be larger than the previous "
                                      f"keyframe's ({pinned[-1]})")
            pinned.append(frame)
        keyframes.append(CameraView(K=K, world_2_cam=pose, width=width, height=height, time=float(time)))
    if pinned and len(pinned) != len(keyframes):
        raise CameraPathError(f"{source}: give 'frame' for every keyframe or for none "
                              f"({len(pinned)} of {len(keyframes)} have one)")
    if pinned and pinned[0] != 0:
        raise CameraPathError(f"{source}: keyframe 0: field 'frame' must be 0 (the video starts at the first keyframe)")
    if pinned and frames is not None and frames != pinned[-1] + 1:
        raise CameraPathError(f"{source}: 'frames' ({frames}) disagrees with the last keyframe's 'frame' "
                              f"({pinned[-1]}); give one or the other")
    known = {"format", "width", "height", "frames", "fps", "keyframes"}
    return CameraPath(keyframes=keyframes, width=width, height=height, frames=frames,
                      keyframe_frames=pinned or None, fps=float(fps) if fps is not None else None,
                      extra={k: v for k, v in data.items() if k not in known})


def read_camera_path(file: str | Path) -> CameraPath:
    """Read and validate a camera path JSON file (see :func:`parse_camera_path`)."""
    file = Path(file)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise CameraPathError(f"{file}: camera path file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CameraPathError(f"{file}: cannot read the camera path ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CameraPathError(f"{file}: not valid JSON ({error})") from None
    return parse_camera_path(data, str(file))
