"""One view rendered by the trained model, in horizontal strips so that a newer view can cancel it.

``model.render_image`` renders a whole image; cutting the image into strips (each strip is the same camera with
its principal point shifted up) lets the viewer look for a cancellation between strips, and lets several tabs
take turns on the one model strip by strip instead of frame by frame. The pixels are the same as one call's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from stages.rendering.sheets import colourise_depth, grey_to_rgb, to_uint8

Mode = Literal["colour", "depth", "alpha"]
MODES: tuple[Mode, ...] = ("colour", "depth", "alpha")
DEPTH_MIN_ALPHA = 0.5  # as export's depth videos: fog has no surface
# A coarse image (160 px wide) in one call: it is never cancelled, and one call is about a quarter faster on the
# CPU than 8192-ray strips (each strip marches and queries on its own).
COARSE_RAYS = 1 << 16


class Cancelled(Exception):
    """A newer view replaced the one being rendered."""


@dataclass(frozen=True)
class Frame:
    """A rendered view on the CPU: rgb on white (H, W, 3), alpha (H, W), z-depth in metres (H, W)."""

    rgb: np.ndarray
    alpha: np.ndarray
    z_depth: np.ndarray
    seconds: float


class FrameRenderer:
    """The one model every tab renders with; a lock (shareable between renderers) lets one strip render at a time."""

    def __init__(self, model: Any, lock: threading.Lock | None = None, strip_rays: int = 8192) -> None:
        self.model = model
        self.strip_rays = strip_rays
        self.lock = lock or threading.Lock()

    def render(self, K: np.ndarray, world_2_cam: np.ndarray, width: int, height: int, timestep: int,
               cancelled: Callable[[], bool] = lambda: False) -> Frame:
        started = time.perf_counter()
        rows = max(1, self.strip_rays // width)
        parts: dict[str, list[np.ndarray]] = {"rgb": [], "alpha": [], "z_depth": []}
        for top in range(0, height, rows):
            if cancelled():
                raise Cancelled
            strip_K = np.array(K, dtype=np.float64)
            strip_K[1, 2] -= top
            strip = min(rows, height - top)
            with self.lock:
                out = self.model.render_image(strip_K, world_2_cam, width, strip, timestep, chunk=self.strip_rays)
                for key in parts:
                    parts[key].append(out[key].detach().float().clamp_min(0).cpu().numpy())
        return Frame(*(np.concatenate(parts[key]) for key in ("rgb", "alpha", "z_depth")),
                     seconds=time.perf_counter() - started)


def picture(frame: Frame, mode: Mode, depth_range: tuple[float, float]) -> np.ndarray:
    """What the page shows for a render mode: (H, W, 3) uint8."""
    if mode == "depth":
        surface = np.where(frame.alpha >= DEPTH_MIN_ALPHA, frame.z_depth, 0.0)
        return colourise_depth(surface, *depth_range)
    if mode == "alpha":
        return grey_to_rgb(frame.alpha)
    return to_uint8(frame.rgb)


def depth_range(camera_centre: np.ndarray, box: np.ndarray) -> tuple[float, float]:
    """A depth scale for one view: the distance to the scene box's centre, plus or minus its half extent."""
    centre, half = box.mean(axis=0), float((box[1] - box[0]).min()) / 2
    distance = float(np.linalg.norm(np.asarray(camera_centre) - centre))
    return max(distance - half, 1e-3), distance + half

