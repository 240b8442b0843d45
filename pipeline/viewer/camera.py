"""The browser's camera in the pipeline's convention, and the render sizes derived from it.

viser reports a camera as its centre, a camera-to-world rotation (OpenCV axes: x right, y down, z forward, the
same as our ``world_2_cam``) and a vertical field of view; the model wants ``K`` and ``world_2_cam`` for a pixel
size. Keeping the conversion here keeps the rest of the viewer free of quaternions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from stages.core.cameras import camera_center, quaternion_to_rotation, rotation_to_quaternion


@dataclass(frozen=True)
class ViewPose:
    """Where the viewer looks from: camera centre, camera-to-world rotation as (w, x, y, z), vertical FOV, aspect."""

    position: tuple[float, float, float]
    wxyz: tuple[float, float, float, float]
    fov: float  # radians, vertical
    aspect: float  # width / height of the browser's canvas

    @classmethod
    def of(cls, position: np.ndarray, wxyz: np.ndarray, fov: float, aspect: float) -> "ViewPose":
        """Rounded below what a pixel shows, so the browser echoing a pose back is not a new view."""
        return cls(tuple(round(float(v), 7) for v in position), tuple(round(float(v), 7) for v in wxyz),
                   round(float(fov), 7), round(float(aspect), 5))

    def world_2_cam(self) -> np.ndarray:
        rotation = quaternion_to_rotation(np.asarray(self.wxyz))  # camera -> world
        pose = np.eye(4)
        pose[:3, :3] = rotation.T
        pose[:3, 3] = -rotation.T @ np.asarray(self.position)
        return pose

    def intrinsics(self, width: int, height: int) -> np.ndarray:
        """A centred pinhole with square pixels whose vertical FOV is the browser's."""
        focal = height / 2 / math.tan(self.fov / 2)
        return np.array([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])


def pose_of_rig_camera(K: np.ndarray, world_2_cam: np.ndarray, width: int, height: int) -> ViewPose:
    """A rig camera as the browser shows it (its vertical FOV; the principal point's offset is not kept)."""
    w2c = np.asarray(world_2_cam, dtype=np.float64)
    return ViewPose.of(camera_center(w2c), rotation_to_quaternion(w2c[:3, :3].T), vertical_fov(K, height),
                       width / height)


def vertical_fov(K: np.ndarray, height: int) -> float:
    return 2 * math.atan(height / 2 / float(np.asarray(K)[1, 1]))


@dataclass(frozen=True)
class RenderSizes:
    """Pixel sizes for a canvas aspect: a coarse image ``coarse_width`` wide while moving, and a full one with as
    many pixels as a stored frame (the render's cost is per pixel, so a wide canvas costs what a rig frame costs)."""

    coarse_width: int = 160
    full_pixels: int = 220 * 320

    def coarse(self, aspect: float) -> tuple[int, int]:
        width = min(self.coarse_width, self.full(aspect)[0])
        return width, max(1, round(width / aspect))

    def full(self, aspect: float) -> tuple[int, int]:
        width = max(1, round(math.sqrt(self.full_pixels * aspect)))
        return width, max(1, round(width / aspect))
