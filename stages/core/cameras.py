"""Camera conventions, in one place so no stage invents its own.

Stored convention (ARCHITECTURE.md): ``world_2_cam`` is a 4x4 rigid transform, OpenCV camera axes
(x right, y down, z forward), metres; ``K`` is a 3x3 pinhole matrix for the stored frame size.
Pixel (u, v) = (0, 0) is the top-left corner of the top-left pixel, so pixel centres sit at +0.5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import CalibrationError

# Flipping y and z turns OpenCV camera axes into OpenGL / nerfstudio / Blender axes and back.
_FLIP_YZ = np.diag([1.0, -1.0, -1.0, 1.0])


def invert_pose(pose: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 transform (or a batch ...x4x4) without a general matrix inverse."""
    pose = np.asarray(pose, dtype=np.float64)
    rotation = pose[..., :3, :3]
    translation = pose[..., :3, 3]
    inverse = np.zeros_like(pose)
    inverse[..., :3, :3] = np.swapaxes(rotation, -1, -2)
    inverse[..., :3, 3] = -np.einsum("...ji,...j->...i", rotation, translation)
    inverse[..., 3, 3] = 1.0
    return inverse


def world_2_cam_to_cam_2_world(world_2_cam: np.ndarray) -> np.ndarray:
    return invert_pose(world_2_cam)


def cam_2_world_to_world_2_cam(cam_2_world: np.ndarray) -> np.ndarray:
    return invert_pose(cam_2_world)


def opencv_to_opengl(cam_2_world: np.ndarray) -> np.ndarray:
    """cam_2_world with OpenCV axes -> cam_2_world with OpenGL axes (x right, y up, z backward)."""
    return np.asarray(cam_2_world, dtype=np.float64) @ _FLIP_YZ


def opengl_to_opencv(cam_2_world: np.ndarray) -> np.ndarray:
    """The inverse of :func:`opencv_to_opengl` (the flip is its own inverse)."""
    return np.asarray(cam_2_world, dtype=np.float64) @ _FLIP_YZ


def camera_center(world_2_cam: np.ndarray) -> np.ndarray:
    """Camera centre in world coordinates: -R^T t."""
    return invert_pose(world_2_cam)[..., :3, 3]


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = (0.0, 1.0, 0.0)) -> np.ndarray:
    """world_2_cam (OpenCV axes) of a camera at ``eye`` looking at ``target``; ``up`` is world up."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:
        raise ValueError(f"look_at: up {up} is parallel to the viewing direction {forward}")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    cam_2_world = np.eye(4)
    cam_2_world[:3, 0], cam_2_world[:3, 1], cam_2_world[:3, 2], cam_2_world[:3, 3] = right, down, forward, eye
    return invert_pose(cam_2_world)


def rescale_intrinsics(K: np.ndarray, scale_x: float, scale_y: float | None = None) -> np.ndarray:
    """K for an image resized by (scale_x, scale_y): fx, fy, cx, cy scale alike, no half-pixel shift.

    With pixel centres at +0.5 a resize by s maps continuous coordinate u to s*u, so this is exact.
    """
    scale_y = scale_x if scale_y is None else scale_y
    scaled = np.asarray(K, dtype=np.float64).copy()
    scaled[0, :] *= scale_x
    scaled[1, :] *= scale_y
    return scaled


def intrinsics_for_size(K: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """K calibrated for ``from_size`` (width, height) rescaled to frames of ``to_size`` (width, height)."""
    return rescale_intrinsics(K, to_size[0] / from_size[0], to_size[1] / from_size[1])


def transform_points(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 transform to (..., 3) points."""
    transform = np.asarray(transform, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ transform[:3, :3].T + transform[:3, 3]


def project(points_world: np.ndarray, K: np.ndarray, world_2_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (..., 3) -> pixel coordinates (..., 2) and z-depth (...) in the camera."""
    points_cam = transform_points(world_2_cam, points_world)
    z = points_cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uvw = points_cam @ np.asarray(K, dtype=np.float64).T
        uv = uvw[..., :2] / uvw[..., 2:3]
    return uv, z


def unproject(uv: np.ndarray, z_depth: np.ndarray, K: np.ndarray, world_2_cam: np.ndarray) -> np.ndarray:
    """Pixel coordinates (..., 2) with z-depth (...) -> world points (..., 3)."""
    uv = np.asarray(uv, dtype=np.float64)
    homogeneous = np.concatenate([uv, np.ones_like(uv[..., :1])], axis=-1)
    directions = homogeneous @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T  # z == 1
    points_cam = directions * np.asarray(z_depth, dtype=np.float64)[..., None]
    return transform_points(invert_pose(world_2_cam), points_cam)


def pixel_centers(width: int, height: int) -> np.ndarray:
    """(height, width, 2) array of (u, v) pixel-centre coordinates."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    return np.stack([u, v], axis=-1)


def pixel_rays(
    K: np.ndarray, world_2_cam: np.ndarray, uv: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rays through pixel coordinates ``uv`` (..., 2).

    Returns world-space origins (..., 3), unit directions (..., 3) and, per ray, the z component of the
    unit direction in camera space, which converts a distance along the ray into z-depth (z = t * dz).
    """
    uv = np.asarray(uv, dtype=np.float64)
    homogeneous = np.concatenate([uv, np.ones_like(uv[..., :1])], axis=-1)
    directions_cam = homogeneous @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T
    directions_cam /= np.linalg.norm(directions_cam, axis=-1, keepdims=True)
    cam_2_world = invert_pose(world_2_cam)
    directions = directions_cam @ cam_2_world[:3, :3].T
    origins = np.broadcast_to(cam_2_world[:3, 3], directions.shape).copy()
    return origins, directions, directions_cam[..., 2]


# --- COLMAP: world-to-camera, OpenCV axes, quaternion (w, x, y, z) ---------------------------------


def rotation_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """3x3 rotation -> unit quaternion (w, x, y, z) with w >= 0."""
    R = np.asarray(rotation, dtype=np.float64)
    trace = np.trace(R)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> 3x3 rotation."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def world_2_cam_to_colmap(world_2_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """world_2_cam -> COLMAP (qvec wxyz, tvec); COLMAP shares our OpenCV world-to-camera convention."""
    world_2_cam = np.asarray(world_2_cam, dtype=np.float64)
    return rotation_to_quaternion(world_2_cam[:3, :3]), world_2_cam[:3, 3].copy()


def colmap_to_world_2_cam(qvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    world_2_cam = np.eye(4)
    world_2_cam[:3, :3] = quaternion_to_rotation(qvec)
    world_2_cam[:3, 3] = tvec
    return world_2_cam


# --- camera_params.json -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraParams:
    """A rig calibration: world_2_cam per serial and K per serial, for ``image_size`` frames.

    ``shared_intrinsics`` records whether the file held one K for every camera (the raw NeRSemble
    dataset does, for full-size 2200x3208 frames) so that a writer can keep the file's form.
    """

    world_2_cam: dict[str, np.ndarray]
    intrinsics: dict[str, np.ndarray]
    shared_intrinsics: bool = False

    @property
    def serials(self) -> list[str]:
        return list(self.world_2_cam)


def _as_matrix(value: object, shape: tuple[int, int], what: str, path: Path) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise CalibrationError(f"{path}: {what} is not a numeric matrix ({error})") from None
    if matrix.shape != shape:
        raise CalibrationError(f"{path}: {what} must be a finite {shape[0]}x{shape[1]} matrix, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        bad = sorted({"NaN" if np.isnan(v) else "infinity" for v in matrix.ravel() if not np.isfinite(v)})
        rows, cols = np.nonzero(~np.isfinite(matrix))
        raise CalibrationError(f"{path}: {what} has {' and '.join(bad)} at row {rows[0]}, column {cols[0]}; "
                               f"it must be a finite {shape[0]}x{shape[1]} matrix")
    return matrix


def read_camera_params(path: str | Path) -> CameraParams:
    """Read a NeRSemble ``camera_params.json``: ``world_2_cam`` per serial, ``intrinsics`` shared or per serial."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"{path}: calibration file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CalibrationError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("world_2_cam"), dict) or "intrinsics" not in data:
        raise CalibrationError(f"{path}: expected keys 'world_2_cam' (serial -> 4x4) and 'intrinsics'")
    if not data["world_2_cam"]:
        raise CalibrationError(f"{path}: 'world_2_cam' lists no cameras")

    world_2_cam: dict[str, np.ndarray] = {}
    for serial, value in data["world_2_cam"].items():
        pose = _as_matrix(value, (4, 4), f"world_2_cam of camera {serial}", path)
        rotation = pose[:3, :3]
        if not np.allclose(pose[3], [0, 0, 0, 1]) or not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4):
            raise CalibrationError(f"{path}: world_2_cam of camera {serial} is not a rigid transform")
        world_2_cam[str(serial)] = pose

    raw_intrinsics = data["intrinsics"]
    shared = not isinstance(raw_intrinsics, dict)
    if shared:
        K = _as_matrix(raw_intrinsics, (3, 3), "shared intrinsics", path)
        intrinsics = {serial: K.copy() for serial in world_2_cam}
    else:
        intrinsics = {
            str(serial): _as_matrix(value, (3, 3), f"intrinsics of camera {serial}", path)
            for serial, value in raw_intrinsics.items()
        }
        missing = sorted(set(world_2_cam) - set(intrinsics))
        if missing:
            raise CalibrationError(f"{path}: cameras {', '.join(missing)} have world_2_cam but no intrinsics")
    for serial, K in intrinsics.items():
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise CalibrationError(f"{path}: intrinsics of camera {serial} have a non-positive focal length")
    return CameraParams(world_2_cam=world_2_cam, intrinsics=intrinsics, shared_intrinsics=shared)


def write_camera_params(path: str | Path, params: CameraParams) -> None:
    """Write ``camera_params.json`` in the dataset's form (shared K when the cameras share one)."""
    intrinsics: object
    if params.shared_intrinsics:
        intrinsics = next(iter(params.intrinsics.values())).tolist()
    else:
        intrinsics = {serial: K.tolist() for serial, K in params.intrinsics.items()}
    payload = {"world_2_cam": {s: p.tolist() for s, p in params.world_2_cam.items()}, "intrinsics": intrinsics}
    Path(path).write_text(json.dumps(payload, indent=2))
