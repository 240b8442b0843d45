"""The 3D scene of one tab: the rig's cameras as frusta (training and hold-out in two colours), the scene box,
and where every tab's view starts.

Each tab builds its own nodes so that toggling an overlay or highlighting a camera in one tab leaves the others
alone; a click on a frustum reports the camera's serial.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.viewer.camera import ViewPose, pose_of_rig_camera, vertical_fov
from pipeline.viewer.sequence import ViewerSequence
from stages.core.cameras import camera_center, look_at, rotation_to_quaternion
from stages.rendering.paths import rig_frame

TRAINING_COLOUR = (40, 110, 255)
HOLDOUT_COLOUR = (255, 130, 0)
SELECTED_COLOUR = (20, 200, 70)
BOX_COLOUR = (230, 190, 0)
FRUSTUM_SIZE = 0.05  # of the rig's mean camera distance


class RigScene:
    def __init__(self, scene: Any, sequence: ViewerSequence, on_click: Callable[[str], None]) -> None:
        self.sequence = sequence
        self.selected: str | None = None
        cams = sequence.cameras
        centres = [pose_of_rig_camera(cams.intrinsics[s], cams.world_2_cam[s], cams.width, cams.height)
                   for s in cams.serials]
        distance = float(np.mean([np.linalg.norm(np.asarray(p.position) - sequence.box_centre) for p in centres]))
        self.frustum_scale = FRUSTUM_SIZE * distance  # depth of a frustum's far rectangle, metres
        self.frusta: dict[str, Any] = {}
        for serial, pose in zip(cams.serials, centres):
            handle = scene.add_camera_frustum(
                f"/rig/cam_{serial}", fov=pose.fov, aspect=pose.aspect, scale=self.frustum_scale,
                thickness=2.0, thickness_units="screen", color=self.colour(serial), wxyz=pose.wxyz,
                position=pose.position)
            handle.on_click(lambda _event, serial=serial: on_click(serial))
            self.frusta[serial] = handle
        box = sequence.box
        self.box = scene.add_box("/scene_box", color=BOX_COLOUR, dimensions=tuple(box[1] - box[0]), wireframe=True,
                                 position=tuple(box.mean(axis=0)), visible=False, cast_shadow=False,
                                 receive_shadow=False)

    def colour(self, serial: str) -> tuple[int, int, int]:
        if serial == self.selected:
            return SELECTED_COLOUR
        return HOLDOUT_COLOUR if self.sequence.is_holdout(serial) else TRAINING_COLOUR

    def select(self, serial: str | None) -> None:
        previous, self.selected = self.selected, serial
        for name in {previous, serial} - {None}:
            self.frusta[name].color = self.colour(name)

    def show_box(self, visible: bool) -> None:
        self.box.visible = visible

    def show_rig(self, visible: bool) -> None:
        for handle in self.frusta.values():
            handle.visible = visible


def initial_pose(sequence: ViewerSequence, aspect: float = 1.0) -> ViewPose:
    """The rig's mean camera: its mean viewing direction and distance, looking at the scene box centre."""
    cams, centre = sequence.cameras, sequence.box_centre
    poses = [np.asarray(cams.world_2_cam[s], dtype=np.float64) for s in cams.serials]
    offsets = np.array([camera_center(p) for p in poses]) - centre
    distances = np.linalg.norm(offsets, axis=1)
    direction = (offsets / distances[:, None]).mean(axis=0)
    direction /= np.linalg.norm(direction)
    up = rig_frame(poses, centre).up
    eye = centre + direction * float(distances.mean())
    w2c = look_at(eye, centre, up)
    fov = float(np.median([vertical_fov(cams.intrinsics[s], cams.height) for s in cams.serials]))
    return ViewPose.of(eye, rotation_to_quaternion(w2c[:3, :3].T), fov, aspect)
