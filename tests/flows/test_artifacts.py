"""What the UI shows of a run: reports without empty columns or cut-off values, key figures in one line,
thumbnails as data URIs, and training progress as one bar and one status table that end in the final state."""

import base64
import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from prefect import flow

from flows.artifacts import SequenceOverview, per_camera_rows, report_markdown, stage_pictures
from flows.figures import stage_line
from stages.rendering.thumbnails import MAX_WIDTH, data_uri, video_strip
from flows.progress import TrainingProgressArtifacts
from stages.core.video import encode_video
from storage import SequenceWorkDir


def test_a_provided_calibration_has_no_empty_columns():
    report = {"status": "completed", "cameras": {
        "222200037": {"registered": True, "observations": None, "reprojection_error_mean_px": None,
                      "reprojection_error_median_px": None},
        "222200042": {"registered": True, "observations": None, "reprojection_error_mean_px": None,
                      "reprojection_error_median_px": None}}}
    assert per_camera_rows(report) == [{"camera": "222200037", "registered": True},
                                       {"camera": "222200042", "registered": True}]


def test_long_values_leave_the_table_for_a_wrapped_details_list():
    decoded = {f"2222000{i:02d}": 24 for i in range(16)}
    report = {"status": "completed", "cameras": list(decoded), "frames": 24, "frames_per_camera_decoded": decoded,
              "decode_seconds": 12.34, "warnings": [], "color_corrected": None,
              "protocol": {"references": {"matte": "stored frame composited on white with the matting alpha"}}}
    markdown = report_markdown("ingest", report)
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert all(len(line) < 100 for line in table), table
    assert "| frames | 24 |" in table
    assert not any("color_corrected" in line or "warnings" in line for line in markdown.splitlines())
    details = markdown.split("**details**")[1]
    assert "- **frames_per_camera_decoded**" in details and "222200015: 24" in details
    assert "  - **references**" in details and "matting alpha" in details
    assert markdown.splitlines()[2] == "16 cameras, 24 frames, in 12.3 s"


@pytest.mark.parametrize(("stage", "report", "line"), [
    ("ingest", {"status": "completed", "cameras": ["a", "b"], "frames": 24, "size": [220, 320],
                "decode_seconds": 12.3}, "ingest completed: 2 cameras, 24 frames, 220x320, in 12.3 s"),
    ("calibrate", {"status": "completed", "solution": "provided", "cameras_total": 16, "timings_s": {"total": 0.02}},
     "calibrate completed: provided calibration, 16 cameras, in 0.0 s"),
    ("optimize", {"status": "completed", "steps": 2225, "steps_planned": 3000, "psnr_train": 24.1,
                  "train_seconds": 300.0, "stopped_by": "time_budget"},
     "optimize completed: 2225/3000 steps, train PSNR 24.10 dB, in 300.0 s, stopped by time_budget"),
    ("evaluate", {"status": "skipped", "psnr": 24.71, "ssim": 0.8512, "lpips": "disabled", "images": 1},
     "evaluate skipped: finished earlier: PSNR 24.71 dB, SSIM 0.851, 1 image"),
    ("depth", {"status": "failed", "errors": ["camera 7: no sources"]}, "depth failed: camera 7: no sources"),
])
def test_one_log_line_per_stage_carries_its_key_figures(stage, report, line):
    assert stage_line(stage, report) == line


def _decoded(uri: str) -> np.ndarray:
    header, payload = uri.split(",", 1)
    assert header in ("data:image/jpeg;base64", "data:image/png;base64")
    return cv2.imdecode(np.frombuffer(base64.b64decode(payload), np.uint8), cv2.IMREAD_COLOR)


def test_pictures_are_small_thumbnails():
    noisy = np.random.default_rng(0).integers(0, 256, (2000, 3000, 3), dtype=np.uint8)
    uri = data_uri(noisy)
    assert _decoded(uri).shape[1] == MAX_WIDTH and len(uri) < 400_000
    small = np.zeros((40, 60, 3), np.uint8)
    assert _decoded(data_uri(small, photo=False)).shape[:2] == (40, 60)  # never upscaled


def test_a_turntable_strip_shows_frames_from_across_the_video(tmp_path):
    frames = [np.full((64, 48, 3), 40 * i, np.uint8) for i in range(6)]
    encode_video(tmp_path / "turntable.mp4", frames, fps=6.0)
    strip = video_strip(tmp_path / "turntable.mp4", frames=3, height=32)
    assert strip.shape == (32, 3 * 24, 3)
    brightness = [strip[:, i * 24:(i + 1) * 24].mean() for i in range(3)]
    assert brightness == sorted(brightness) and brightness[2] - brightness[0] > 60


def test_stage_pictures_come_from_the_work_folder_and_skip_missing_files(tmp_path):
    work = SequenceWorkDir.for_sequence(str(tmp_path), "001", "EXP-1-head")
    assert stage_pictures("matte", work, {}) == []
    ok, png = cv2.imencode(".png", np.full((30, 40, 3), 200, np.uint8))
    work.write_bytes("export/previews/matte.png", png.tobytes())
    [(caption, uri)] = stage_pictures("matte", work, {})
    assert caption == "matte preview" and _decoded(uri).shape[:2] == (30, 40)
    sheet = work.write_bytes("export/holdout/cam_7.png", png.tobytes())
    [(caption, _)] = stage_pictures("evaluate", work, {"sheets": {"7": sheet}})
    assert "hold-out camera 7" in caption


def _artifacts(key: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def _progress(step: int, total: int = 3000, psnr: float = 20.0) -> SimpleNamespace:
    return SimpleNamespace(step=step, total_steps=total, psnr=psnr, losses={"total": 0.1}, rays_per_s=1e5,
                           elapsed_s=step / 10, eta_s=(total - step) / 10)


@flow
def _training(progress: TrainingProgressArtifacts, clock: SimpleNamespace) -> None:
    for step in range(0, 2250, 25):  # a time budget stops training at step 2225 of 3000
        clock.now = step / 10
        progress(_progress(step))
    progress.finish({"status": "completed", "steps": 2225, "steps_planned": 3000, "psnr_train": 24.5,
                     "train_seconds": 300.0, "stopped_by": "time_budget"})


def test_training_shows_one_bar_and_one_status_that_end_in_the_final_state(prefect_harness):
    clock = SimpleNamespace(now=0.0)
    progress = TrainingProgressArtifacts("901", "BUDGET", every_s=3.0, table_every_s=30.0, clock=lambda: clock.now)
    _training(progress, clock)
    [status] = _artifacts(progress.status_key)
    [bar] = _artifacts(progress.progress_key)
    assert "completed (time_budget) at step 2225/3000, train PSNR 24.50 dB" in status.data
    assert bar.data == 100.0 and "completed (time_budget)" in bar.description


@flow
def _overview() -> str:
    overview = SequenceOverview("902", "ORDER", ["ingest", "matte", "optimize"])
    overview.stage("matte", "completed", "plate, 3 cameras")
    overview.stage("ingest", "completed", "3 cameras, 2 frames")
    overview.stage("optimize", "failed", "TrainingError: no rays")
    overview.finish("failed after 3.0 s")
    return overview.key


def test_the_overview_lists_stages_in_pipeline_order_and_updates_in_place(prefect_harness):
    key = _overview()
    [artifact] = _artifacts(key)
    rows = [line.split(" | ")[0].strip("| ") for line in artifact.data.splitlines() if line.startswith("| ")][2:]
    assert rows == ["ingest", "matte", "optimize"]
    assert "failed after 3.0 s" in artifact.data and "TrainingError: no rays" in artifact.data
    json.dumps(artifact.data)  # plain text: what the UI renders


def test_the_overview_names_the_viewer_and_links_a_running_one(tmp_path):
    from storage import SequenceWorkDir  # noqa: PLC0415
    from storage.viewers import MARKER, announce_viewer, running_viewer_url, withdraw_viewer  # noqa: PLC0415

    work = SequenceWorkDir.for_sequence(str(tmp_path), "903", "VIEW")
    overview = SequenceOverview("903", "VIEW", ["optimize"], work)
    assert "nersemble-pipeline view" not in overview.markdown()  # nothing to view before training
    overview.rows["optimize"] = ("completed", "")
    assert f"`nersemble-pipeline view {work.uri}`" in overview.markdown()
    assert "is running" not in overview.markdown()
    announce_viewer(work, "http://127.0.0.1:8080/")  # this process plays the viewer
    assert running_viewer_url(work) == "http://127.0.0.1:8080/"
    assert "[http://127.0.0.1:8080/](http://127.0.0.1:8080/)" in overview.markdown()
    withdraw_viewer(work)
    assert not work.exists(MARKER) and running_viewer_url(work) is None
    work.write_json(MARKER, {"url": "http://127.0.0.1:9/", "host": __import__("socket").gethostname(),
                             "pid": 2**22 + 12345})  # a viewer that was killed: its process is gone
    assert running_viewer_url(work) is None and "is running" not in overview.markdown()

