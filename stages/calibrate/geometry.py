"""Pose geometry for the calibrate stage: similarity alignment, pose errors, the metric world frame, sanity checks.

Numpy only, so every rule that decides whether an estimated calibration is trusted can be tested without
running COLMAP. Poses are ``world_2_cam`` 4x4 (OpenCV axes) keyed by camera serial, as everywhere in the
pipeline; an SfM estimate lives in an arbitrary frame and scale until :class:`Similarity` moves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.core.cameras import camera_center, invert_pose

Poses = dict[str, np.ndarray]


@dataclass(frozen=True)
class Similarity:
    """``x' = scale * rotation @ x + translation``: the map from an estimate's world to the target world."""

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    @classmethod
    def identity(cls) -> Similarity:
        return cls(1.0, np.eye(3), np.zeros(3))

    def apply_points(self, points: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(points, dtype=np.float64) @ self.rotation.T + self.translation

    def apply_pose(self, world_2_cam: np.ndarray) -> np.ndarray:
        """The same camera expressed in the new world: rotation R R_s^T, translation s t - R R_s^T t_s."""
        pose = np.asarray(world_2_cam, dtype=np.float64)
        rotation = pose[:3, :3] @ self.rotation.T
        out = np.eye(4)
        out[:3, :3] = rotation
        out[:3, 3] = self.scale * pose[:3, 3] - rotation @ self.translation
        return out

    def apply_poses(self, poses: Poses) -> Poses:
        return {serial: self.apply_pose(pose) for serial, pose in poses.items()}

    def matrix(self) -> np.ndarray:
        """3x4 ``[s R | t]`` (what ``pycolmap.Sim3d`` is built from)."""
        return np.concatenate([self.scale * self.rotation, self.translation[:, None]], axis=1)


def umeyama(source: np.ndarray, target: np.ndarray) -> Similarity:
    """Least-squares similarity taking ``source`` (n, 3) points onto ``target`` (Umeyama 1991).

    Needs at least three points that are not collinear; camera centres of a rig always are not.
    """
    source, target = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 3 or len(source) < 3:
        raise ValueError(f"umeyama needs two (n>=3, 3) point sets of equal shape, got {source.shape} and "
                         f"{target.shape}")
    mu_s, mu_t = source.mean(0), target.mean(0)
    ds, dt = source - mu_s, target - mu_t
    var_s = (ds**2).sum() / len(source)
    covariance = dt.T @ ds / len(source)
    u, sigma, vt = np.linalg.svd(covariance)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1.0
    if var_s <= 0 or sigma[1] <= 1e-12 * max(sigma[0], 1e-300):
        raise ValueError("umeyama: the source points are (nearly) collinear; the similarity is not determined")
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(sigma) @ sign) / var_s)
    return Similarity(scale, rotation, mu_t - scale * rotation @ mu_s)


def _axis_points(poses: Poses, serials: list[str], lever: float) -> np.ndarray:
    """Each camera's centre and the points ``lever`` along its x, y and z axes: (4 n, 3)."""
    points = []
    for serial in serials:
        cam_2_world = invert_pose(poses[serial])
        centre = cam_2_world[:3, 3]
        points.append(centre)
        points.extend(centre + lever * cam_2_world[:3, axis] for axis in range(3))
    return np.array(points)


def align_to(estimate: Poses, reference: Poses) -> Similarity:
    """Similarity from the estimate's world to the reference's, fitted on centres *and* orientations.

    Centres alone fix the rotation only to about (centre error / rig size): with 2 mm noise on a 1.6 m arc
    that is ~0.1 deg, more than SfM's own rotation error. So each camera also contributes the points one
    subject distance along its axes (where it looks), which weighs its orientation like its centre.
    """
    common = sorted(set(estimate) & set(reference))
    centres_est = np.array([camera_center(estimate[s]) for s in common])
    centres_ref = np.array([camera_center(reference[s]) for s in common])
    rough = umeyama(centres_est, centres_ref)
    try:
        subject = subject_center({s: reference[s] for s in common})
        lever = float(np.median(np.linalg.norm(centres_ref - subject, axis=1)))
    except ValueError:
        lever = float(np.sqrt(((centres_ref - centres_ref.mean(0)) ** 2).sum(1).mean()))
    return umeyama(_axis_points(estimate, common, lever / rough.scale), _axis_points(reference, common, lever))


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle of a 3x3 rotation in degrees (numerically safe near 0 and 180)."""
    cosine = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(cosine)))


def pose_differences(estimate: Poses, reference: Poses) -> dict[str, dict[str, float]]:
    """Per camera: rotation difference (degrees) and camera-centre distance (mm), same world frame assumed."""
    out = {}
    for serial in sorted(set(estimate) & set(reference)):
        relative = estimate[serial][:3, :3] @ reference[serial][:3, :3].T
        centre = np.linalg.norm(camera_center(estimate[serial]) - camera_center(reference[serial]))
        out[serial] = {"rotation_deg": rotation_angle_deg(relative), "center_mm": float(centre * 1000.0)}
    return out


def summarize(values: list[float]) -> dict[str, float] | None:
    """mean / median / max of a list, or None when it is empty (JSON-friendly)."""
    if not values:
        return None
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "median": float(np.median(array)), "max": float(array.max())}


def optical_axes(poses: Poses) -> tuple[np.ndarray, np.ndarray]:
    """Camera centres (n, 3) and unit viewing directions (n, 3), in the order of ``poses``."""
    cam_2_world = np.stack([invert_pose(p) for p in poses.values()])
    return cam_2_world[:, :3, 3], cam_2_world[:, :3, 2]


def subject_center(poses: Poses) -> np.ndarray:
    """The point closest (least squares) to every camera's optical axis: where a rig looks at its subject."""
    centres, directions = optical_axes(poses)
    projector = np.eye(3)[None] - directions[:, :, None] * directions[:, None, :]
    system = projector.sum(0)
    if len(poses) < 2 or np.linalg.cond(system) > 1e8:
        raise ValueError("the cameras' optical axes are (nearly) parallel; they do not meet at a subject")
    return np.linalg.solve(system, (projector @ centres[:, :, None]).sum(0)[:, 0])


def metric_frame(poses: Poses, subject_distance: float) -> Similarity:
    """Similarity that puts the subject at the origin, y up, +z towards the cameras, and cameras
    ``subject_distance`` metres (median) from the subject.

    Used when no calibration was provided: SfM fixes neither scale nor frame, and the rig's known
    camera-to-subject distance is the one metric fact every capture has. Up is the cameras' mean -y axis.
    """
    centre = subject_center(poses)
    centres, _ = optical_axes(poses)
    distances = np.linalg.norm(centres - centre, axis=1)
    scale = subject_distance / float(np.median(distances))
    up = -np.mean([invert_pose(p)[:3, 1] for p in poses.values()], axis=0)
    up /= np.linalg.norm(up)
    forward = np.mean((centres - centre) / distances[:, None], axis=0)
    forward -= up * (forward @ up)
    if np.linalg.norm(forward) < 1e-6:  # cameras all around the subject: any horizontal axis will do
        forward = np.cross(up, [1.0, 0.0, 0.0]) if abs(up[0]) < 0.9 else np.cross(up, [0.0, 0.0, 1.0])
    forward /= np.linalg.norm(forward)
    rotation = np.stack([np.cross(up, forward), up, forward])  # rows: the new x, y, z axes in the old world
    return Similarity(scale, rotation, -scale * rotation @ centre)


def focal_problem(focal: float, expected: float | None, size: tuple[int, int], max_deviation: float) -> str | None:
    """Why a focal length is implausible, or None: far from the provided one, or a field of view no rig has."""
    if expected is not None:
        if abs(focal / expected - 1.0) > max_deviation:
            return (f"focal length {focal:.1f}px is {100 * (focal / expected - 1):+.0f}% off the expected "
                    f"{expected:.1f}px")
        return None
    longest = max(size)
    if not 0.25 * longest <= focal <= 25.0 * longest:
        return f"focal length {focal:.1f}px is implausible for {size[0]}x{size[1]} frames"
    return None


def geometry_problems(poses: Poses) -> dict[str, list[str]]:
    """Cameras that cannot belong to a rig looking at one subject: the subject behind them, or two at one spot."""
    problems: dict[str, list[str]] = {serial: [] for serial in poses}
    if len(poses) < 2:
        return problems
    try:
        centre = subject_center(poses)
    except ValueError as error:
        return {serial: [str(error)] for serial in poses}
    centres, directions = optical_axes(poses)
    serials = list(poses)
    spread = float(np.median(np.linalg.norm(centres - centre, axis=1)))
    for i, serial in enumerate(serials):
        depth = float((centre - centres[i]) @ directions[i])
        if depth <= 0.05 * spread:
            problems[serial].append("the subject (where the optical axes meet) is behind the camera")
        others = np.delete(centres, i, axis=0)
        if len(others) and np.min(np.linalg.norm(others - centres[i], axis=1)) < 1e-3 * spread:
            problems[serial].append("its centre coincides with another camera's")
    return problems
