"""One browser tab: its camera, timestep, render mode and chosen rig camera, and the renders that follow them.

Every tab has its own state and render thread; the model, the renderer's lock and the keyframe file are the
viewer's, shared. A tab that closes mid-render only stops its own threads: nothing it left behind is waited on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.viewer.camera import RenderSizes, ViewPose, pose_of_rig_camera
from pipeline.viewer.compare import Comparison, CompareWorker
from pipeline.viewer.frames import COARSE_STRIP_RAYS, FrameRenderer, Mode, StripPool, depth_range, picture
from pipeline.viewer.keyframes import KeyframeFile
from pipeline.viewer.panel import Panel, PanelActions
from pipeline.viewer.progressive import Delivered, ProgressiveRenderer, ViewRequest
from pipeline.viewer.scene import RigScene
from pipeline.viewer.sequence import ViewerSequence

PLAY_TICK_HZ = 30.0  # the slider moves at most this often; time itself runs at the capture's frame rate
JPEG_QUALITY = 90
ARRIVAL_S = 3.0  # at most this long a new tab's camera may take to reach the initial pose


@dataclass(frozen=True)
class ShownFrame:
    """A picture sent to the tab: for tests, benchmarks and the status line."""

    pose: ViewPose
    timestep: int
    mode: str
    size: tuple[int, int]
    full: bool
    render_s: float
    sent_at: float  # time.monotonic()
    checksum: int


@dataclass
class SharedRendering:
    """What every tab renders with: the full-quality renderer, the fast one for coarse images, their threads."""

    full: FrameRenderer
    coarse: FrameRenderer
    sizes: RenderSizes
    pool: StripPool

    @classmethod
    def for_sequence(cls, sequence: ViewerSequence, sizes: RenderSizes | None = None,
                     workers: int | None = None) -> "SharedRendering":
        """Full renders in cancellable strips, coarse ones a strip per worker, all on one pool of threads."""
        pool = StripPool.for_device(sequence.device, workers)
        cams = sequence.cameras
        return cls(full=FrameRenderer(sequence.trained.model, pool),
                   coarse=FrameRenderer(sequence.coarse.model, pool, strip_rays=COARSE_STRIP_RAYS),
                   sizes=sizes or RenderSizes(full_pixels=cams.width * cams.height), pool=pool)


def render_picture(rendering: SharedRendering, box: np.ndarray, request: ViewRequest, size: tuple[int, int],
                   cancelled: Callable[[], bool]) -> np.ndarray:
    """The viewer's render path: the coarse model below the full size, the full model at it, then the mode."""
    renderer = rendering.full if size == rendering.sizes.full(request.pose.aspect) else rendering.coarse
    pose = request.pose
    frame = renderer.render(pose.intrinsics(*size), pose.world_2_cam(), size[0], size[1], request.timestep,
                            cancelled)
    return picture(frame, request.mode, depth_range(np.asarray(pose.position), box))


class Session:
    def __init__(self, client: Any, sequence: ViewerSequence, rendering: SharedRendering,
                 keyframes: KeyframeFile, initial: ViewPose) -> None:
        self.client, self.sequence, self.rendering, self.keyframes = client, sequence, rendering, keyframes
        self.initial = initial
        self.timestep, self.mode, self.selected = 0, "colour", None
        self.shown: deque[ShownFrame] = deque(maxlen=256)
        self.comparisons: deque[Comparison] = deque(maxlen=32)
        self._playing = threading.Event()
        self._closed = False
        self._arrived, self._connected_at = False, time.monotonic()
        self.scene = RigScene(client.scene, sequence, self.select_camera)
        self.panel = Panel(client.gui, sequence, PanelActions(
            timestep=self.set_timestep, play=self.play, mode=self.set_mode, box=self.scene.show_box,
            rig=self.scene.show_rig, camera=self.select_camera, reset_view=self.reset_view,
            save_view=self.save_view), rendering.pool.workers, str(keyframes.file))
        self.progressive = ProgressiveRenderer(self._render, self._deliver, rendering.sizes,
                                               name=f"viewer-render-{client.client_id}")
        self.compare = CompareWorker(sequence, rendering.full, rendering.sizes.full_pixels, self._show_comparison)
        client.camera.on_update(lambda _camera: self.refresh())
        self.refresh()

    # --- what the tab asks for -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Render the tab's current view next (a newer view replaces any render in flight)."""
        if self._closed:
            return
        self.progressive.show(ViewRequest(self._pose(), self.timestep, self.mode))
        if self.selected is not None:
            self.compare.request(self.selected, self.timestep)

    def _pose(self) -> ViewPose:
        """The browser's camera; until it has glided from its default pose to the initial one, the initial one
        (so the first image is of the view the page is about to show, not of the poses on the way)."""
        camera = self.client.camera
        reported = ViewPose.of(camera.position, camera.wxyz, camera.fov, camera.aspect)
        if not self._arrived:
            near = np.allclose(camera.position, self.initial.position, atol=1e-3)
            if not near and time.monotonic() - self._connected_at < ARRIVAL_S:
                return replace(self.initial, aspect=reported.aspect)
            self._arrived = True
        return reported

    def set_timestep(self, timestep: int) -> None:
        timestep = int(np.clip(timestep, 0, self.sequence.n_timesteps - 1))
        if timestep != self.timestep:
            self.timestep = timestep
            if self.panel.timestep.value != timestep:
                self.panel.timestep.value = timestep
            self.refresh()

    def set_mode(self, mode: Mode) -> None:
        self.mode = mode
        self.refresh()

    @property
    def playing(self) -> bool:
        return self._playing.is_set()

    def play(self, on: bool) -> None:
        """Play through time at the capture's frame rate, looping; the renders keep up as far as they can."""
        if on and not self._playing.is_set() and self.sequence.n_timesteps > 1:
            self._playing.set()
            threading.Thread(target=self._play, name="viewer-play", daemon=True).start()
        elif not on:
            self._playing.clear()
        self.panel.show_playing(self._playing.is_set())

    def select_camera(self, serial: str | None) -> None:
        """Move the view to a rig camera and compare with its stored frame (None: stop comparing)."""
        if serial == self.selected:
            return
        self.selected = serial
        self.scene.select(serial)
        self.panel.show_camera(serial)
        if serial is not None:
            cams = self.sequence.cameras
            self.move_to(pose_of_rig_camera(cams.intrinsics[serial], cams.world_2_cam[serial], cams.width,
                                            cams.height))
        self.refresh()

    def reset_view(self) -> None:
        self.move_to(self.initial)
        self.refresh()

    def move_to(self, pose: ViewPose) -> None:
        """Put the browser's camera at a pose, orbiting around the point ahead of it nearest the scene box centre."""
        position = np.asarray(pose.position)
        rotation = ViewPose.of(position, pose.wxyz, pose.fov, pose.aspect).world_2_cam()[:3, :3]
        forward, up = rotation[2], -rotation[1]
        distance = max(float((self.sequence.box_centre - position) @ forward), 1e-3)
        camera = self.client.camera
        with self.client.atomic():
            camera.fov = pose.fov
            camera.position = position
            camera.look_at = position + distance * forward
            camera.up_direction = up

    def save_view(self) -> None:
        camera = self.client.camera
        count = self.keyframes.append(ViewPose.of(camera.position, camera.wxyz, camera.fov, camera.aspect),
                                      self.timestep)
        self.panel.path_note.content = (f"{count} keyframe{'s' if count != 1 else ''} in `{self.keyframes.file}`; "
                                        f"render them with `nersemble-pipeline export {self.sequence.work.uri} "
                                        f"--path {self.keyframes.file}`")

    def close(self) -> None:
        self._closed = True
        self._playing.clear()
        self.progressive.stop()
        self.compare.stop()

    # --- rendering --------------------------------------------------------------------------------------------

    def _render(self, request: ViewRequest, size: tuple[int, int], cancelled: Callable[[], bool]) -> np.ndarray:
        return render_picture(self.rendering, self.sequence.box, request, size, cancelled)

    def _deliver(self, delivered: Delivered) -> None:
        if self._closed:
            return
        image = delivered.image
        self.client.scene.set_background_image(image, format="jpeg", jpeg_quality=JPEG_QUALITY)
        request = delivered.request
        shown = ShownFrame(request.pose, request.timestep, request.mode, (image.shape[1], image.shape[0]),
                           delivered.full, delivered.seconds, time.monotonic(), int(image.sum()))
        self.shown.append(shown)
        quality = "full" if shown.full else "coarse"
        self.panel.status.content = (f"timestep {shown.timestep} · {shown.size[0]}x{shown.size[1]} {quality} · "
                                     f"{shown.render_s * 1000:.0f} ms")

    def _show_comparison(self, comparison: Comparison) -> None:
        if self._closed or comparison.serial != self.selected:
            return
        self.comparisons.append(comparison)
        self.panel.show_comparison(comparison)

    def _play(self) -> None:
        start_time, start_step = time.monotonic(), self.timestep
        while self._playing.is_set() and not self._closed:
            elapsed = time.monotonic() - start_time
            self.set_timestep((start_step + int(elapsed * self.sequence.fps)) % self.sequence.n_timesteps)
            time.sleep(1.0 / min(PLAY_TICK_HZ, self.sequence.fps))
