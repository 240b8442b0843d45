"""What the calibrate stage leaves in ``calibration/``: a COLMAP text model and a nerfstudio ``transforms.json``.

Both describe exactly the K and world_2_cam written to the capture store, so a tool reading either sees the
calibration the pipeline trains with. Frames stay in ``capture.zarr``; ``file_path`` in ``transforms.json``
names where an export of frame (camera, timestep) would go (``images/cam_<serial>/<frame index>.png``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pycolmap

from stages.core.cameras import opencv_to_opengl, world_2_cam_to_cam_2_world
from storage import SequenceWorkDir

COLMAP_DIR = "calibration/colmap"
TRANSFORMS = "calibration/transforms.json"


def frame_file(serial: str, frame_index: int) -> str:
    """Relative path of one frame in an image export (nerfstudio wants a path per frame)."""
    return f"images/cam_{serial}/{frame_index:06d}.png"


def transforms_json(intrinsics: dict[str, np.ndarray], world_2_cam: dict[str, np.ndarray], size: tuple[int, int],
                    frame_indices: list[int], fps: float, source: str) -> dict:
    """nerfstudio-style transforms: one entry per (camera, timestep) with its own intrinsics and time.

    ``time`` is normalised to [0, 1] over the stored frames (what dynamic NeRF loaders expect);
    ``time_seconds`` counts from the first stored frame. ``transform_matrix`` is cam_2_world, OpenGL axes.
    """
    width, height = size
    count = len(frame_indices)
    frames = []
    for serial in sorted(world_2_cam):
        K = intrinsics[serial]
        cam_2_world = opencv_to_opengl(world_2_cam_to_cam_2_world(world_2_cam[serial]))
        for t, frame_index in enumerate(frame_indices):
            frames.append({
                "file_path": frame_file(serial, frame_index),
                "camera": serial,
                "timestep": t,
                "frame_index": int(frame_index),
                "time": t / (count - 1) if count > 1 else 0.0,
                "time_seconds": t / fps,
                "fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2]),
                "w": width, "h": height,
                "transform_matrix": cam_2_world.tolist(),
            })
    return {
        "camera_model": "OPENCV",
        "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "w": width, "h": height,
        "fps": fps,
        "calibration": source,
        "store": "../capture.zarr",
        "cameras": sorted(world_2_cam),
        "frames": frames,
    }


def write_colmap_text(work: SequenceWorkDir, reconstruction: pycolmap.Reconstruction) -> str:
    """Write the model with ``Reconstruction.write_text`` locally, then copy it into the work folder."""
    with tempfile.TemporaryDirectory(prefix="calibrate-model-") as folder:
        reconstruction.write_text(folder)
        for path in sorted(Path(folder).iterdir()):
            work.write_bytes(f"{COLMAP_DIR}/{path.name}", path.read_bytes())
    return work.path(COLMAP_DIR)


def write_transforms(work: SequenceWorkDir, payload: dict) -> str:
    return work.write_json(TRANSFORMS, payload)


def clear_outputs(work: SequenceWorkDir) -> None:
    """Remove an earlier run's files, so a model from another mode (e.g. old points3D) never lingers."""
    from storage import uri as uris

    fs, root = uris.filesystem(work.calibration_uri)
    if fs.exists(root):
        fs.rm(root, recursive=True)
