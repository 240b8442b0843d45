"""The viewer (``nersemble-pipeline view``) in a real browser, on a really trained tiny model.

Headless Chromium (Debian's ``chromium``, driven over its DevTools protocol with the ``websockets`` package, so
nothing is downloaded) opens the page from a viewer this module starts on 127.0.0.1; the server side records
every picture it sends, and the browser's screenshots show them arrive. Every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.synthetic import synthesize_capture
from pipeline.viewer.camera import RenderSizes, ViewPose, pose_of_rig_camera
from pipeline.viewer.frames import Cancelled, FrameRenderer, StripPool
from pipeline.viewer.progressive import ProgressiveRenderer, ViewRequest
from stages.calibrate.config import CalibrateConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig
from stages.rendering.paths import read_camera_path
from storage import SequenceWorkDir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-extensions", "--mute-audio")
PAGE_SIZE = (900, 600)
TRAIN_STEPS = 40
TINY = {  # as tests/evaluate: a model that learns the synthetic head's colours in seconds
    "hash.n_levels": 6, "hash.log2_table_size": 12, "rays_per_batch": 256, "target_samples_per_batch": 0,
    "images_per_batch": 6, "repeat_images": 4, "step_size": 0.12, "lambda_alpha": 1.0, "occupancy.warmup_steps": 16,
    "deformation.window": [0, 7, 0, 30], "hash.window": [1, 4, 10, 30], "lr_step_size": 60, "eval.chunk": 2048,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wait_for(predicate, what: str, timeout: float = 20.0, poll: float = 0.05):  # noqa: ANN001, ANN201
    """The predicate's first truthy value, or a failure naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if isinstance(value, np.ndarray) or value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- the trained sequence ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("raw"), cameras=5, frames=3, width=48, height=64, seed=1)


@pytest.fixture(scope="module")
def trained(capture, tmp_path_factory) -> tuple[SequenceWorkDir, str]:
    """ingest -> calibrate (provided) -> matte (plate) -> optimize: the real stages, a tiny model, seconds."""
    from stages.calibrate.stage import calibrate_sequence
    from stages.ingest.stage import ingest_sequence
    from stages.matte.stage import matte_sequence
    from stages.optimize.stage import optimize_sequence

    root = tmp_path_factory.mktemp("work")
    ingest_sequence(capture.sequence_dir, str(root), IngestConfig())
    work = SequenceWorkDir.for_sequence(str(root), capture.participant_dir.name, capture.sequence_dir.name)
    calibrate_sequence(work.uri, CalibrateConfig(mode="provided"))
    matte_sequence(work.uri, MatteConfig(method="plate", workers=1))
    holdout = capture.cameras[2]
    optimize_sequence(work.uri, OptimizeConfig(steps=TRAIN_STEPS, overrides=TINY, holdout_cameras=[holdout],
                                               device="cpu", encoding="torch", seed=3))
    return work, holdout


@pytest.fixture(scope="module")
def sequence(trained):
    from pipeline.viewer.sequence import open_sequence

    return open_sequence(trained[0].uri, device="cpu")


@pytest.fixture(scope="module")
def viewer(sequence, tmp_path_factory):
    from pipeline.viewer.server import Viewer

    # The full size has a stored frame's pixels (48x64); the coarse image is half as wide, so both kinds run.
    # Two strip workers, as on this 2-core machine: the strips of a view render side by side.
    served = Viewer(sequence, host="127.0.0.1", port=0, sizes=RenderSizes(coarse_width=32, full_pixels=48 * 64),
                    path_file=tmp_path_factory.mktemp("paths") / "camera_path.json", workers=2)
    yield served
    served.stop()


# --- a browser over the DevTools protocol --------------------------------------------------------------------


class Chromium:
    """One headless Chromium page, driven over the DevTools protocol (no driver binary, no download)."""

    def __init__(self, url: str, size: tuple[int, int] = PAGE_SIZE) -> None:
        from websockets.sync.client import connect

        self.profile = tempfile.mkdtemp(prefix="viewer-chromium-")
        self.process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={size[0]},{size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            active = Path(self.profile) / "DevToolsActivePort"
            port = wait_for(lambda: active.exists() and active.read_text().split()[:1], "Chromium's DevTools port")[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10) as answer:
                page = next(t for t in json.load(answer) if t["type"] == "page")
            self.socket = connect(page["webSocketDebuggerUrl"], max_size=64 << 20, open_timeout=10)
            self.next_id = 0
            self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                      mobile=False)
            self.call("Page.navigate", url=url)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, timeout: float = 15.0, **params) -> dict:  # noqa: ANN003
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):  # noqa: ANN201
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result.get("result", {}).get("value")

    def screenshot(self) -> np.ndarray:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    def mouse(self, kind: str, x: float, y: float, buttons: int = 0, button: str = "none") -> None:
        self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button=button, buttons=buttons, clickCount=1)

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 10) -> None:
        self.mouse("mouseMoved", *start)
        self.mouse("mousePressed", *start, buttons=1, button="left")
        for i in range(1, steps + 1):
            s = i / steps
            self.mouse("mouseMoved", start[0] + s * (end[0] - start[0]), start[1] + s * (end[1] - start[1]),
                       buttons=1, button="left")
            time.sleep(0.02)
        self.mouse("mouseReleased", *end, buttons=0, button="left")

    def click(self, x: float, y: float) -> None:
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, buttons=1, button="left")
        self.mouse("mouseReleased", x, y, buttons=0, button="left")

    def wheel(self, x: float, y: float, delta_y: float) -> None:
        self.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=y, deltaX=0, deltaY=delta_y)

    def key(self, key: str, code: str, key_code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code)

    def close(self) -> None:
        socket_ = getattr(self, "socket", None)
        if socket_ is not None:
            socket_.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page(viewer):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium; `make browser` does it)")
    browser = Chromium(viewer.url)
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def session(viewer, page):
    """The server side of the page's tab, once its first full-size picture was sent."""
    tab = wait_for(lambda: next(iter(viewer.sessions.values()), None), "the page to connect", timeout=30)
    wait_for(lambda: any(frame.full for frame in tab.shown), "the first full-size image", timeout=30)
    return tab


def canvas_region(screenshot: np.ndarray) -> np.ndarray:
    """The part of the page left of the side panel, where the render shows."""
    return screenshot[:, : screenshot.shape[1] // 2]


def settled(tab, after: int, timeout: float = 20.0):  # noqa: ANN001, ANN201
    """The full-size frame of the tab's newest view, sent after its first ``after`` frames."""
    def newest():  # noqa: ANN202
        wanted = tab.progressive.current
        return next((f for f in list(tab.shown)[after:] if f.full and f.pose == wanted.pose
                     and f.timestep == wanted.timestep), None)

    return wait_for(newest, "a full-size image of the new view", timeout=timeout)


# --- in the browser ---------------------------------------------------------------------------------------------


def test_first_image_arrives(session, page):
    first = session.shown[0]
    assert first.timestep == 0 and first.mode == "colour"
    # The page opened at the rig's mean camera (the server's initial camera), looking at the scene box centre.
    assert np.allclose(first.pose.position, session.initial.position, atol=1e-4)
    forward = first.pose.world_2_cam()[2, :3]
    to_centre = session.sequence.box_centre - np.asarray(first.pose.position)
    assert forward @ to_centre / np.linalg.norm(to_centre) > 0.9999
    assert not first.full  # coarse first, then the full size
    full = next(frame for frame in session.shown if frame.full)
    assert full.size[0] * full.size[1] == pytest.approx(48 * 64, rel=0.1)
    # ... and the browser shows it: the render area is no longer one flat colour.
    shot = wait_for(lambda: (lambda s: s if canvas_region(s).std() > 5 else None)(page.screenshot()),
                    "the render to appear on the page", timeout=10)
    assert canvas_region(shot).std() > 5
    # The side panel names the sequence, the model's step and the device rendering.
    text = page.evaluate("document.body.innerText")
    sequence = session.sequence
    assert sequence.name in text and f"model step {sequence.trained.step}" in text and "rendering on cpu" in text


def test_camera_move_changes_the_image(session, page):
    wait_for(lambda: session.progressive.current is not None, "a view")
    before_pose, before_count = session.progressive.current.pose, len(session.shown)
    before_shot = canvas_region(page.screenshot())
    before_sum = session.shown[-1].checksum
    page.drag((200, 300), (330, 260))
    frame = settled(session, before_count)
    assert session.progressive.current.pose != before_pose
    assert frame.checksum != before_sum
    after_shot = wait_for(lambda: (lambda s: s if np.abs(s.astype(int) - before_shot).mean() > 1 else None)(
        canvas_region(page.screenshot())), "the page to show the moved view", timeout=10)
    assert np.abs(after_shot.astype(int) - before_shot).mean() > 1


def test_time_slider_changes_the_timestep(session, page):
    count = len(session.shown)
    focused = page.evaluate("(() => { const s = document.querySelector('[role=slider]'); if (!s) return false;"
                            " s.focus(); return document.activeElement === s; })()")
    assert focused, "the time slider is not on the page"
    page.key("ArrowRight", "ArrowRight", 39)
    wait_for(lambda: session.timestep == 1, "the slider to reach the server")
    frame = wait_for(lambda: next((f for f in list(session.shown)[count:] if f.full and f.timestep == 1), None),
                     "a full-size render of timestep 1")
    assert frame.timestep == 1


def _click_button(page, label: str) -> bool:  # noqa: ANN001
    return page.evaluate("(() => { const b = Array.from(document.querySelectorAll('button'))"
                         f".find(b => b.textContent.trim() === {json.dumps(label)}); if (!b) return false;"
                         " b.click(); return true; })()")


def test_play_runs_through_time_and_pause_stops_it(session, page):
    count = len(session.shown)
    assert _click_button(page, "Play")
    seen = wait_for(lambda: (lambda steps: steps if len(steps) >= 2 else None)(
        {f.timestep for f in list(session.shown)[count:]}), "pictures of two timesteps while playing")
    assert len(seen) >= 2
    assert wait_for(lambda: _click_button(page, "Pause"), "the Pause button")
    wait_for(lambda: not session.playing, "playback to stop")
    stopped_at = session.timestep
    time.sleep(0.3)
    assert session.timestep == stopped_at


def test_render_modes_change_the_picture(session):
    sums = {}
    for mode in ("depth", "alpha", "colour"):
        count = len(session.shown)
        session.panel.mode.value = mode  # as the dropdown does
        frame = wait_for(lambda: next((f for f in list(session.shown)[count:] if f.full and f.mode == mode), None),
                         f"a full-size {mode} picture")
        sums[mode] = frame.checksum
    assert len(set(sums.values())) == 3


def camera_at_rest(tab, quiet_s: float = 0.5) -> bool:  # noqa: ANN001
    """True once the browser's camera has reported no change for ``quiet_s`` (its controls glide after a wheel)."""
    before = tab.client.camera.position.copy()
    time.sleep(quiet_s)
    return bool(np.allclose(before, tab.client.camera.position))


def _frustum_point_on_page(session, serial: str) -> tuple[float, float] | None:  # noqa: ANN001
    """Where on the page the middle of a rig camera's frustum's far edge is, from the tab's camera."""
    camera, cams = session.client.camera, session.sequence.cameras
    rig = pose_of_rig_camera(cams.intrinsics[serial], cams.world_2_cam[serial], cams.width, cams.height)
    # viser draws the far rectangle at (+-tan(fov/2) aspect, +-tan(fov/2), 1), scaled to a volume set by `scale`;
    # aim at the middle of its top edge.
    half_height = math.tan(rig.fov / 2)
    volume = (half_height * rig.aspect * half_height / 3) ** (1 / 3)
    local = np.array([0.0, -half_height, 1.0]) / volume * session.scene.frustum_scale
    rig_w2c = rig.world_2_cam()
    world = rig_w2c[:3, :3].T @ (local - rig_w2c[:3, 3])
    view = ViewPose.of(camera.position, camera.wxyz, camera.fov, camera.aspect)
    width, height = PAGE_SIZE  # the canvas fills the page (its pixel buffer may be smaller: viser adapts it)
    w2c, K = view.world_2_cam(), view.intrinsics(width, height)
    p = w2c[:3, :3] @ world + w2c[:3, 3]
    if p[2] <= 0:
        return None
    u, v = K[0, 0] * p[0] / p[2] + K[0, 2], K[1, 1] * p[1] / p[2] + K[1, 2]
    inside = 20 < u < width * 0.55 and 20 < v < height - 20  # clear of the side panel and the edges
    return (float(u), float(v)) if inside else None


def test_clicking_a_rig_camera_shows_its_stored_frame(session, page, trained):
    _, holdout = trained
    session.reset_view()
    centre = session.sequence.box_centre
    start = np.linalg.norm(np.asarray(session.initial.position) - centre)

    def zoomed_out() -> bool:  # the wheel zooms; far enough back, the rig's frusta are in front of the view
        if np.linalg.norm(session.client.camera.position - centre) > 2.5 * start:
            return True
        page.wheel(200, 300, 400)
        return False

    wait_for(zoomed_out, "the mouse wheel to zoom out", poll=0.1)
    wait_for(lambda: camera_at_rest(session), "the zoom to come to rest")
    serial, where = wait_for(lambda: next(((s, p) for s in session.sequence.cameras.serials
                                           if (p := _frustum_point_on_page(session, s))), None),
                             "a rig camera frustum in view")
    page.click(*where)
    wait_for(lambda: session.selected == serial, f"the click on camera {serial} to reach the server")
    comparison = wait_for(lambda: next((c for c in session.comparisons if c.serial == serial
                                        and c.render is not None), None), "the comparison to render")
    stored = session.sequence.store.read_frame(serial, comparison.timestep)
    assert np.array_equal(comparison.stored, stored)
    assert (comparison.error is not None) == (serial == holdout)
    # The page shows the stored frame in the side panel, and the view moved to the camera.
    wait_for(lambda: page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 8"
                                   " && i.offsetParent !== null).length") >= 2, "the stored frame on the page")
    camera_centre = np.asarray(session.client.camera.position)
    rig_centre = -session.sequence.cameras.world_2_cam[serial][:3, :3].T @ session.sequence.cameras.world_2_cam[
        serial][:3, 3]
    assert np.allclose(camera_centre, rig_centre, atol=1e-4)


def test_save_view_writes_a_keyframe_export_reads(session, page, viewer):
    assert _click_button(page, "Save view")
    path = wait_for(lambda: viewer.keyframes.file.exists() and read_camera_path(viewer.keyframes.file),
                    "the camera path file")
    assert len(path.keyframes) == 1
    keyframe = path.keyframes[0]
    assert (path.width, path.height) == (48, 64)
    assert keyframe.time == pytest.approx(session.timestep / (session.sequence.n_timesteps - 1))
    centre = -keyframe.world_2_cam[:3, :3].T @ keyframe.world_2_cam[:3, 3]
    assert np.allclose(centre, session.client.camera.position, atol=1e-5)


def test_a_tab_closing_mid_render_leaves_the_server_serving(viewer, session, page):
    pool, held = viewer.rendering.pool, threading.Event()
    busy = [pool.executor.submit(held.wait, 30) for _ in range(pool.workers)]  # every strip waits behind these
    try:
        target = page.call("Target.createTarget", url=viewer.url)["targetId"]
        second = wait_for(lambda: next((s for s in viewer.sessions.values() if s is not session), None),
                          "the second tab to connect", timeout=30)
        wait_for(lambda: second.progressive.current is not None, "the second tab's first render to start")
        page.call("Target.closeTarget", targetId=target)
        wait_for(lambda: second.client.client_id not in viewer.sessions, "the closed tab to leave")
        assert not second.shown  # it left before a picture of it was done
    finally:
        held.set()
    wait_for(lambda: all(job.done() for job in busy), "the pool to run again")
    count = len(session.shown)
    page.drag((250, 250), (200, 320))
    settled(session, count)  # the first tab still renders
    with urllib.request.urlopen(viewer.url, timeout=10) as answer:
        assert answer.status == 200


# --- without a browser ------------------------------------------------------------------------------------------


def test_rig_camera_pose_round_trips(sequence):
    cams = sequence.cameras
    for serial in cams.serials:
        pose = pose_of_rig_camera(cams.intrinsics[serial], cams.world_2_cam[serial], cams.width, cams.height)
        assert np.allclose(pose.world_2_cam(), cams.world_2_cam[serial], atol=1e-5)
        K = pose.intrinsics(cams.width, cams.height)
        assert K[1, 1] == pytest.approx(cams.intrinsics[serial][1, 1], rel=1e-5)


def test_holdout_scores_come_from_the_evaluate_report_first(tmp_path):
    from pipeline.viewer.sequence import holdout_scores

    work = SequenceWorkDir(str(tmp_path / "001" / "SEQ"))
    assert holdout_scores(work) is None
    work.write_json("export/metrics.json", {"model_step": 7, "results": {"matte": {"overall": {"psnr": 21.5,
                                                                                             "ssim": 0.8}}}})
    scores = holdout_scores(work)
    assert (scores.psnr, scores.ssim, scores.step) == (21.5, 0.8, 7) and "metrics.json" in scores.source
    work.write_report("evaluate", {"psnr": 24.25, "ssim": 0.9, "model_step": 9})
    scores = holdout_scores(work)
    assert (scores.psnr, scores.ssim, scores.step, scores.source) == (24.25, 0.9, 9, "reports/evaluate.json")


def test_the_view_starts_at_the_rigs_mean_camera(sequence):
    from pipeline.viewer.scene import initial_pose

    pose, cams, centre = initial_pose(sequence), sequence.cameras, sequence.box_centre
    distances = [np.linalg.norm(-cams.world_2_cam[s][:3, :3].T @ cams.world_2_cam[s][:3, 3] - centre)
                 for s in cams.serials]
    assert np.linalg.norm(np.asarray(pose.position) - centre) == pytest.approx(np.mean(distances), rel=1e-5)
    forward = pose.world_2_cam()[2, :3]
    assert forward @ (centre - pose.position) / np.linalg.norm(centre - pose.position) == pytest.approx(1.0)


def test_render_sizes_keep_the_pixel_budget():
    sizes = RenderSizes(coarse_width=160, full_pixels=220 * 320)
    assert sizes.full(220 / 320) == (220, 320)
    assert sizes.coarse(220 / 320) == (160, 233)
    wide = sizes.full(16 / 9)
    assert abs(wide[0] * wide[1] - 220 * 320) < 600 and sizes.coarse(16 / 9) == (160, 90)


def test_strips_render_what_one_call_renders(sequence):
    cams, model = sequence.cameras, sequence.trained.model
    serial = cams.serials[0]
    K, w2c = cams.intrinsics[serial], cams.world_2_cam[serial]
    whole = model.render_image(K, w2c, cams.width, cams.height, 1)
    pool = StripPool(2)
    try:
        for _ in range(3):  # 13 five-row strips, two at a time on one model
            strips = FrameRenderer(model, pool, strip_rays=48 * 5).render(K, w2c, cams.width, cams.height, 1)
            assert np.allclose(strips.rgb, whole["rgb"].numpy(), atol=1e-5)
            assert np.allclose(strips.alpha, whole["alpha"].numpy(), atol=1e-5)
            assert np.allclose(strips.z_depth, whole["z_depth"].numpy(), atol=1e-5)
        with pytest.raises(Cancelled):
            FrameRenderer(model, pool).render(K, w2c, cams.width, cams.height, 1, cancelled=lambda: True)
    finally:
        pool.shutdown()


def _scripted_renders(hold: dict[tuple[int, int], threading.Event]):  # noqa: ANN202
    """A render function that records what it was asked for and, for the sizes in ``hold``, waits (cancellably)."""
    started = []

    def render(request, size, cancelled):  # noqa: ANN001, ANN202
        started.append((request.timestep, size))
        release = hold.get(size)
        while release is not None and not release.wait(0.01):
            if cancelled():
                raise Cancelled
        return np.zeros((size[1], size[0], 3), np.uint8)

    return render, started


POSE = ViewPose((0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0), 1.0, 1.0)
SIZES = RenderSizes(coarse_width=20, full_pixels=1600)  # coarse 20x20, full 40x40


def test_a_new_view_cancels_the_full_render_in_flight():
    """Coarse at once for a new view, the full size once it rests; a newer view stops the full render in flight."""
    release = threading.Event()
    render, started = _scripted_renders({(40, 40): release})
    delivered = []
    progressive = ProgressiveRenderer(render, delivered.append, SIZES, rest_s=0.3)
    try:
        progressive.show(ViewRequest(POSE, 0, "colour"))
        wait_for(lambda: (0, (40, 40)) in started, "the full render of view 0", timeout=5)
        progressive.show(ViewRequest(POSE, 1, "colour"))  # cancels view 0's full render
        wait_for(lambda: (1, (40, 40)) in started, "the full render of view 1", timeout=5)
        release.set()
        wait_for(lambda: any(d.full for d in delivered), "a full picture", timeout=5)
    finally:
        progressive.stop()
    assert [(d.request.timestep, d.full) for d in delivered] == [(0, False), (1, False), (1, True)]


def test_a_view_that_already_rests_goes_straight_to_full_size():
    """The last pose of a drag, picked up after the coarse render in flight, needs no coarse image of its own."""
    release = threading.Event()
    render, started = _scripted_renders({(20, 20): release})
    delivered = []
    progressive = ProgressiveRenderer(render, delivered.append, SIZES, rest_s=0.05)
    try:
        progressive.show(ViewRequest(POSE, 0, "colour"))
        wait_for(lambda: (0, (20, 20)) in started, "the coarse render of view 0", timeout=5)
        progressive.show(ViewRequest(POSE, 1, "colour"))
        time.sleep(0.2)  # view 1 rests while view 0's coarse render is still running
        release.set()
        wait_for(lambda: any(d.full and d.request.timestep == 1 for d in delivered), "view 1 in full", timeout=5)
    finally:
        progressive.stop()
    assert [(d.request.timestep, d.full) for d in delivered] == [(0, False), (1, True)]


# --- bad input: one line naming the problem and the command that fixes it ----------------------------------------


def _view(*args: str):  # noqa: ANN202
    return CliRunner().invoke(app, ["view", *args])


def test_view_refuses_a_sequence_never_optimized(trained, tmp_path):
    work, _ = trained
    copy = tmp_path / work.participant / work.sequence
    shutil.copytree(work.uri, copy, ignore=shutil.ignore_patterns("nersemble"))
    result = _view(str(copy), "--device", "cpu")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "never optimized" in lines[0] and f"nersemble-pipeline optimize {copy}" in lines[0]


def test_view_refuses_a_damaged_checkpoint(trained, tmp_path):
    work, _ = trained
    copy = tmp_path / work.participant / work.sequence
    shutil.copytree(work.uri, copy)
    newest = sorted((copy / "nersemble" / "checkpoints").glob("step-*.pt"))[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    result = _view(str(copy), "--device", "cpu")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and newest.name in lines[0] and "nersemble-pipeline optimize" in lines[0]


def test_view_opens_an_older_checkpoint_or_names_the_kept_ones(trained, tmp_path):
    from pipeline.viewer.sequence import open_sequence

    work, _ = trained
    copy = tmp_path / work.participant / work.sequence
    shutil.copytree(work.uri, copy)
    folder = copy / "nersemble" / "checkpoints"
    newest = sorted(folder.glob("step-*.pt"))[-1]
    shutil.copy(newest, folder / "step-0000001.pt")  # an older step's file (same weights)
    older = open_sequence(str(copy), device="cpu", checkpoint=1)
    assert older.trained.holdout_cameras == [trained[1]] and not older.warnings
    result = _view(str(copy), "--device", "cpu", "--checkpoint", "7")
    assert result.exit_code == 1
    assert "no checkpoint for step 7" in result.output and f"--checkpoint {TRAIN_STEPS}" in result.output


def test_view_refuses_a_port_in_use(trained):
    work, _ = trained
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _view(work.uri, "--device", "cpu", "--port", str(port))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and f"--port {port + 1}" in lines[0]
