"""One view rendered by the trained model, in horizontal strips: a newer view cancels it between strips, and
the strips render side by side on a pool of threads.

``model.render_image`` renders a whole image; a strip is the same camera with its principal point shifted up, so
the pixels are the same as one call's. On the CPU the pool has a worker per core, each running torch on one
thread: on this 2-core machine two intra-op threads made a coarse image several times slower whenever another
process held a core (their barriers spin), while two strips on one thread each degrade to one thread's speed.
Every tab's strips share the pool, first come first served, so tabs take turns strip by strip.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from stages.rendering.sheets import colourise_depth, grey_to_rgb, to_uint8

Mode = Literal["colour", "depth", "alpha"]
MODES: tuple[Mode, ...] = ("colour", "depth", "alpha")
DEPTH_MIN_ALPHA = 0.5  # as export's depth videos: fog has no surface
FULL_STRIP_RAYS = 8192  # a full-size frame in strips of about this many rays: the cancellation's granularity
COARSE_STRIP_RAYS = 1 << 16  # a coarse image is never cancelled: one strip per worker


class Cancelled(Exception):
    """A newer view replaced the one being rendered."""


@dataclass(frozen=True)
class Frame:
    """A rendered view on the CPU: rgb on white (H, W, 3), alpha (H, W), z-depth in metres (H, W)."""

    rgb: np.ndarray
    alpha: np.ndarray
    z_depth: np.ndarray
    seconds: float


class StripPool:
    """The threads every renderer's strips run on; on the CPU torch is set to one thread per strip."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="viewer-strip")

    @classmethod
    def for_device(cls, device: torch.device, workers: int | None = None) -> "StripPool":
        """A worker per torch thread on the CPU (torch then runs one thread each); one on a GPU."""
        if device.type != "cpu":
            return cls(1)
        workers = workers or torch.get_num_threads()
        torch.set_num_threads(1)
        return cls(workers)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class FrameRenderer:
    """One model (shared by every tab) rendering views in strips on a shared pool."""

    def __init__(self, model: Any, pool: StripPool, strip_rays: int = FULL_STRIP_RAYS) -> None:
        self.model, self.pool, self.strip_rays = model, pool, strip_rays

    def render(self, K: np.ndarray, world_2_cam: np.ndarray, width: int, height: int, timestep: int,
               cancelled: Callable[[], bool] = lambda: False) -> Frame:
        started = time.perf_counter()
        strips = max(self.pool.workers, math.ceil(width * height / self.strip_rays))
        rows = math.ceil(height / min(strips, height))
        futures = [self.pool.executor.submit(self._strip, K, world_2_cam, width, top, min(rows, height - top),
                                             timestep, cancelled) for top in range(0, height, rows)]
        parts = _gather(futures)
        return Frame(*(np.concatenate([part[i] for part in parts]) for i in range(3)),
                     seconds=time.perf_counter() - started)

    def _strip(self, K: np.ndarray, world_2_cam: np.ndarray, width: int, top: int, rows: int, timestep: int,
               cancelled: Callable[[], bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if cancelled():
            raise Cancelled
        strip_K = np.array(K, dtype=np.float64)
        strip_K[1, 2] -= top
        out = self.model.render_image(strip_K, world_2_cam, width, rows, timestep, chunk=width * rows)
        return tuple(out[key].detach().float().clamp_min(0).cpu().numpy() for key in ("rgb", "alpha", "z_depth"))


def _gather(futures: list[Future]) -> list:
    """Every strip's result in order; on a cancellation, the strips not started are dropped and the running ones
    awaited, so no strip of a cancelled view is still rendering when the next view starts."""
    try:
        return [future.result() for future in futures]
    except BaseException:
        for future in futures:
            future.cancel()
        for future in futures:
            if not future.cancelled():
                try:
                    future.result()
                except BaseException:  # noqa: BLE001 - the first error is the one raised
                    pass
        raise


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

