""""Save view": the browser's camera appended as a keyframe to a camera path file that ``export --path`` reads.

The file is read and written with ``stages.rendering.paths`` (the format export validates), so what the viewer
writes is what export renders. Keyframes keep the file's frame size; a new file takes the stored frame size.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

from pipeline.viewer.camera import ViewPose
from stages.rendering.paths import CameraPath, CameraView, read_camera_path, write_camera_path

PINNED_GAP = 24  # frames after the last pinned keyframe, when the file pins them


class KeyframeFile:
    """One camera path file shared by every tab; appends are serialised."""

    def __init__(self, file: Path, size: tuple[int, int], n_timesteps: int) -> None:
        self.file, self.size, self.n_timesteps = Path(file), size, n_timesteps
        self._lock = threading.Lock()

    def append(self, pose: ViewPose, timestep: int) -> int:
        """Add the view as the last keyframe; returns how many keyframes the file now holds."""
        with self._lock:
            path = read_camera_path(self.file) if self.file.exists() else None
            width, height = (path.width, path.height) if path else self.size
            view = CameraView(K=pose.intrinsics(width, height), world_2_cam=pose.world_2_cam(), width=width,
                              height=height, time=timestep / max(self.n_timesteps - 1, 1))
            if path is None:
                path = CameraPath(keyframes=[view], width=width, height=height)
            else:
                pinned = path.keyframe_frames
                path = replace(path, keyframes=[*path.keyframes, view],
                               keyframe_frames=[*pinned, pinned[-1] + PINNED_GAP] if pinned else None,
                               frames=None if pinned else path.frames)
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_camera_path(self.file, path)
            return len(path.keyframes)
