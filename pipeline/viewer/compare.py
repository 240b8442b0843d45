"""A rig camera beside the model: its stored frame, the render from exactly that camera, and for a hold-out
camera the error image (against the frame composited on white with its matte, as evaluate scores it).

Runs on its own thread per tab, newest request wins: choosing another camera or timestep cancels the render in
flight. The stored frame is shown before the render starts, since reading it costs milliseconds.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.viewer.frames import Cancelled, FrameRenderer
from pipeline.viewer.sequence import ViewerSequence
from stages.core.cameras import intrinsics_for_size
from stages.evaluate.truth import composite_on_white
from stages.rendering.sheets import error_heatmap, to_uint8


@dataclass(frozen=True)
class Comparison:
    """Pictures for one (camera, timestep); ``render`` is None until rendered, ``error`` only for hold-outs."""

    serial: str
    timestep: int
    stored: np.ndarray
    render: np.ndarray | None = None
    error: np.ndarray | None = None


def compare_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The stored size, shrunk to at most ``max_pixels`` (a full-size frame of a real capture is many seconds)."""
    scale = min(1.0, math.sqrt(max_pixels / (width * height)))
    return max(1, round(width * scale)), max(1, round(height * scale))


class CompareWorker:
    def __init__(self, sequence: ViewerSequence, renderer: FrameRenderer, max_pixels: int,
                 show: Callable[[Comparison], None]) -> None:
        self.sequence, self.renderer, self.max_pixels, self.show = sequence, renderer, max_pixels, show
        self._wanted: tuple[str, int] | None = None
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="viewer-compare", daemon=True)
        self._thread.start()

    def request(self, serial: str, timestep: int) -> None:
        with self._changed:
            if self._wanted != (serial, timestep):
                self._wanted = (serial, timestep)
                self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def _run(self) -> None:
        done = None
        while True:
            with self._changed:
                while self._wanted == done and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    return
                wanted = self._wanted
            try:
                self._compare(*wanted)
            except Cancelled:
                continue
            except Exception as error:  # noqa: BLE001 - a failed comparison must not end the tab
                print(f"viewer: comparing with camera {wanted[0]} failed: {type(error).__name__}: {error}",
                      file=sys.stderr, flush=True)
            done = wanted

    def _compare(self, serial: str, timestep: int) -> None:
        seq, cams = self.sequence, self.sequence.cameras
        size = compare_size(cams.width, cams.height, self.max_pixels)
        stored = _resize(seq.store.read_frame(serial, timestep), size)
        self.show(Comparison(serial, timestep, stored))
        K = intrinsics_for_size(cams.intrinsics[serial], (cams.width, cams.height), size)
        frame = self.renderer.render(K, cams.world_2_cam[serial], size[0], size[1], timestep,
                                     cancelled=lambda: self._wanted != (serial, timestep) or self._stopped)
        error = None
        if seq.is_holdout(serial):
            alpha = _resize(seq.store.read_alpha(serial, timestep), size)
            error = error_heatmap(frame.rgb, composite_on_white(stored, alpha).image)
        self.show(Comparison(serial, timestep, stored, to_uint8(frame.rgb), error))


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
