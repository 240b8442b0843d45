"""Progressive rendering for one tab: a coarse image at once for the newest view, the full size once it rests.

A view that has already rested by the time the renderer picks it up (the last pose of a drag, found after the
coarse render in flight) goes straight to the full size: its coarse image would only delay the refine.

Only the newest view matters: views that arrive while a render runs replace each other, and a full-size render
is cancelled (between strips) as soon as a newer view arrives. A coarse render is never cancelled, so a view that
changes continuously (a drag, playback) still shows an image every coarse render time.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.viewer.camera import RenderSizes, ViewPose
from pipeline.viewer.frames import Cancelled, Mode


@dataclass(frozen=True)
class ViewRequest:
    """Everything that decides a picture: where from, when, how."""

    pose: ViewPose
    timestep: int
    mode: Mode


@dataclass(frozen=True)
class Delivered:
    """A picture on its way to the page, and what it shows."""

    request: ViewRequest
    image: np.ndarray
    full: bool
    seconds: float  # render time
    version: int


RenderFn = Callable[[ViewRequest, tuple[int, int], Callable[[], bool]], np.ndarray]


class ProgressiveRenderer:
    """One thread per tab that turns the newest ``ViewRequest`` into a coarse, then a full, picture."""

    def __init__(self, render: RenderFn, deliver: Callable[[Delivered], None], sizes: RenderSizes,
                 rest_s: float = 0.1, name: str = "viewer-render") -> None:
        self._render, self._deliver, self.sizes, self.rest_s = render, deliver, sizes, rest_s
        self._changed = threading.Condition()
        self._request: ViewRequest | None = None
        self._version = 0
        self._last_change = 0.0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def show(self, request: ViewRequest) -> None:
        """Render this view next; whatever full render is in flight for an older one stops."""
        with self._changed:
            if request == self._request:
                return
            self._request, self._version, self._last_change = request, self._version + 1, time.monotonic()
            self._changed.notify_all()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def current(self) -> ViewRequest | None:
        return self._request

    def _run(self) -> None:
        finished = 0
        while True:
            with self._changed:
                while self._version == finished and not self._stopped:
                    self._changed.wait()
                if self._stopped:
                    return
                version, request = self._version, self._request
            try:
                finished = self._render_progressively(version, request) or finished
            except Exception as error:  # noqa: BLE001 - one bad render must not end the tab's renders
                print(f"viewer: render failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
                finished = version

    def _render_progressively(self, version: int, request: ViewRequest) -> int | None:
        """Coarse now, full once the view rests; the version fully shown, or None when a newer one came."""
        coarse, full = self.sizes.coarse(request.pose.aspect), self.sizes.full(request.pose.aspect)
        if coarse != full and not self._rested():  # a view that already rests goes straight to the full size
            self._emit(version, request, coarse, full=False, cancelled=lambda: False)
        if not self._wait_for_rest(version):
            return None
        try:
            self._emit(version, request, full, full=True, cancelled=lambda: self._version != version or self._stopped)
        except Cancelled:
            return None
        return version

    def _rested(self) -> bool:
        with self._changed:
            return time.monotonic() - self._last_change >= self.rest_s

    def _wait_for_rest(self, version: int) -> bool:
        """Wait until no new view came for ``rest_s``; False when one came (or the tab closed)."""
        with self._changed:
            while self._version == version and not self._stopped:
                remaining = self._last_change + self.rest_s - time.monotonic()
                if remaining <= 0:
                    return True
                self._changed.wait(remaining)
            return False

    def _emit(self, version: int, request: ViewRequest, size: tuple[int, int], full: bool,
              cancelled: Callable[[], bool]) -> None:
        started = time.perf_counter()
        image = self._render(request, size, cancelled)
        if not self._stopped:
            self._deliver(Delivered(request, image, full, time.perf_counter() - started, version))
