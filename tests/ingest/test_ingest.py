"""Ingest on a small synthetic capture: exact frames, K rescaling, stride, re-runs, and every bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from stages.core.cameras import project, read_camera_params, unproject
from pipeline.cli import app
from stages.core.color import apply_color_correction
from stages.ingest.config import IngestConfig
from stages.core.errors import CaptureLayoutError
from pipeline.synthetic import synthesize_capture
from stages.core.video import encode_video, iter_frames
from stages.ingest.stage import IngestError, ingest_sequence
from storage import CaptureStore, CaptureStoreError, SequenceWorkDir

CAMERAS, FRAMES, WIDTH, HEIGHT = 4, 6, 64, 96


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("archive"), cameras=CAMERAS, frames=FRAMES, width=WIDTH,
                              height=HEIGHT, seed=3)


@pytest.fixture()
def capture_copy(capture, tmp_path):
    """A private copy of the archive for tests that damage it."""
    root = tmp_path / "archive"
    shutil.copytree(capture.root, root)
    return root / capture.participant_dir.name / "sequences" / capture.sequence_dir.name


def _store(work: Path, capture) -> CaptureStore:
    return CaptureStore.open(SequenceWorkDir.for_sequence(str(work), capture.participant_dir.name, capture.sequence_dir.name).capture_uri)


def test_frames_equal_decoded_video_and_rerun_is_skipped(capture, tmp_path):
    report = ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())
    assert report["status"] == "completed"
    assert report["frames"] == FRAMES and report["size"] == [WIDTH, HEIGHT]
    assert report["frames_per_second"] > 0 and report["megabytes_per_second"] > 0
    store = _store(tmp_path, capture)
    assert store.cameras == sorted(capture.video_paths) and all(isinstance(s, str) for s in store.cameras)
    assert store.frame_indices == list(range(FRAMES))
    assert store.fps == pytest.approx(73.0)
    assert store.frames.shape == (CAMERAS, FRAMES, HEIGHT, WIDTH, 3)
    for index, serial in enumerate(store.cameras):
        for t, decoded in enumerate(iter_frames(capture.video_paths[serial])):
            np.testing.assert_array_equal(store.read_frame(index, t), decoded)
        assert store.backgrounds[index].mean() > 10  # the plate was stored
    calibration = read_camera_params(capture.calibration_path)
    np.testing.assert_allclose(store.world_2_cam[store.cameras[0]], calibration.world_2_cam[store.cameras[0]])
    written = json.loads((tmp_path / capture.participant_dir.name / capture.sequence_dir.name / "reports" / "ingest.json").read_text())
    assert written["frames"] == FRAMES

    again = ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())
    assert again["status"] == "skipped"
    assert _store(tmp_path, capture).is_complete("ingest", report["config_hash"])


def test_stride_records_original_indices_and_options_rebuild(capture, tmp_path):
    ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())
    report = ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig(start=1, stride=2, count=2))
    assert report["status"] == "completed"  # other options: rebuilt, not skipped
    store = _store(tmp_path, capture)
    assert store.frame_indices == [1, 3] and store.n_frames == 2
    assert store.fps == pytest.approx(73.0 / 2)
    decoded = list(iter_frames(capture.video_paths[store.cameras[1]]))
    np.testing.assert_array_equal(store.read_frame(1, 0), decoded[1])
    np.testing.assert_array_equal(store.read_frame(1, 1), decoded[3])


def test_downscale_rescales_K_so_ground_truth_depth_reprojects(capture, tmp_path):
    ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig(downscale=2, cameras=list(capture.video_paths)[:3]))
    store = _store(tmp_path, capture)
    assert (store.width, store.height) == (WIDTH // 2, HEIGHT // 2)
    full = read_camera_params(capture.calibration_path)
    truth = zarr.open_group(str(capture.ground_truth_uri), mode="r")
    truth_cameras = list(truth.attrs["cameras"])
    a, b = store.cameras[0], store.cameras[1]
    depth_a = truth["depth"][truth_cameras.index(a), 0]
    depth_b = truth["depth"][truth_cameras.index(b), 0]
    ys, xs = np.nonzero(depth_a)
    points = unproject(np.stack([xs + 0.5, ys + 0.5], -1), depth_a[ys, xs], full.intrinsics[a], full.world_2_cam[a])
    # into camera b through the *stored* (downscaled) calibration
    uv, z = project(points, store.intrinsics[b], store.world_2_cam[b])
    uv_full, _ = project(points, full.intrinsics[b], full.world_2_cam[b])

    def agreement(pixels: np.ndarray) -> float:
        """Share of a's surface points that b's ground-truth depth sees at the pixel they project to."""
        u, v = np.floor(pixels).astype(int).T
        inside = (u >= 0) & (u < WIDTH) & (v >= 0) & (v < HEIGHT)
        seen = depth_b[v[inside], u[inside]]
        return float(((seen > 0) & (np.abs(seen - z[inside]) < 0.01)).sum() / len(u))

    reference = agreement(uv_full)  # what the full-size calibration gives (occlusions included)
    assert reference > 0.3
    assert agreement(uv * 2) == pytest.approx(reference, abs=0.03)  # the stored pixel, in full-size pixels
    assert agreement(uv) < reference / 2  # an un-rescaled K would not agree
    # and in camera a itself the stored K maps a pixel centre to the centre scaled by 1/2
    uv_a, _ = project(points, store.intrinsics[a], store.world_2_cam[a])
    np.testing.assert_allclose(uv_a, np.stack([xs + 0.5, ys + 0.5], -1) / 2, atol=1e-6)
    # and the stored frame is the area-downscaled video frame
    decoded = next(iter_frames(capture.video_paths[a])).astype(float)
    stored = store.read_frame(0, 0)
    block_mean = decoded.reshape(HEIGHT // 2, 2, WIDTH // 2, 2, 3).mean(axis=(1, 3))
    shifted = np.roll(decoded, 1, axis=1).reshape(HEIGHT // 2, 2, WIDTH // 2, 2, 3).mean(axis=(1, 3))
    error = np.abs(block_mean - stored).mean()  # ffmpeg averages in YUV, so not bit-exact
    assert error < 3.0 and error < np.abs(shifted - stored).mean() / 1.5  # and not shifted by a pixel


def test_color_correction_applies_each_cameras_matrix(capture_copy, tmp_path):
    serials = sorted(p.name[4:-4] for p in (capture_copy / "images").glob("cam_*.mp4"))
    gain = np.zeros((3, 4))
    gain[:, :3] = np.diag([1.3, 1.0, 0.8])
    matrices = {serial: gain.tolist() for serial in serials}
    (capture_copy.parent.parent / "calibration" / "color_calibration.json").write_text(json.dumps(matrices))
    ingest_sequence(capture_copy, str(tmp_path), IngestConfig(color_correction=True, count=2))
    store = CaptureStore.open(SequenceWorkDir.for_sequence(str(tmp_path), "001", capture_copy.name).capture_uri)
    decoded = next(iter_frames(capture_copy / "images" / f"cam_{serials[0]}.mp4"))
    np.testing.assert_array_equal(store.read_frame(0, 0), apply_color_correction(decoded, gain))


def test_truncated_video_fails_naming_camera_and_leaves_store_incomplete(capture_copy, tmp_path):
    video = sorted((capture_copy / "images").glob("cam_*.mp4"))[2]
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError) as error:
        ingest_sequence(capture_copy, str(tmp_path), IngestConfig())
    assert video.name[4:-4] in str(error.value) and str(video) in str(error.value)
    assert str(video) in str(error.value).splitlines()[0]  # one-line summaries keep camera and file
    # The store stays marked as unfinished: other stages refuse it and say to run ingest again.
    with pytest.raises(CaptureStoreError, match="did not finish.*run the ingest stage again"):
        CaptureStore.open(SequenceWorkDir.for_sequence(str(tmp_path), "001", capture_copy.name).capture_uri)
    report = json.loads((tmp_path / "001" / capture_copy.name / "reports" / "ingest.json").read_text())
    assert report["status"] == "failed"


def test_video_of_another_size_is_named(capture_copy, tmp_path):
    video = sorted((capture_copy / "images").glob("cam_*.mp4"))[1]
    encode_video(video, [np.zeros((48, 32, 3), np.uint8)] * FRAMES, fps=73.0)
    with pytest.raises(CaptureLayoutError, match="differ in size") as error:
        ingest_sequence(capture_copy, str(tmp_path), IngestConfig())
    assert video.name[4:-4] in str(error.value) and str(video) in str(error.value)
    assert not (tmp_path / "001").exists()  # nothing written


def test_cameras_of_different_length_use_the_common_length(capture_copy, tmp_path):
    video = sorted((capture_copy / "images").glob("cam_*.mp4"))[0]
    frames = list(iter_frames(video))[: FRAMES - 2]
    encode_video(video, frames, fps=73.0)
    report = ingest_sequence(capture_copy, str(tmp_path), IngestConfig())
    assert report["frames"] == FRAMES - 2
    assert any("differ in length" in warning for warning in report["warnings"])


def test_calibration_mismatches(capture_copy, tmp_path):
    calibration_path = capture_copy.parent.parent / "calibration" / "camera_params.json"
    calibration = json.loads(calibration_path.read_text())
    serials = sorted(calibration["world_2_cam"])
    dropped = serials[0]
    del calibration["world_2_cam"][dropped]
    calibration_path.write_text(json.dumps(calibration))
    with pytest.raises(CaptureLayoutError, match=f"no calibration for camera\\(s\\) {dropped}"):
        ingest_sequence(capture_copy, str(tmp_path), IngestConfig())
    # excluding that camera works; a calibrated camera without video is only a warning
    (capture_copy / "images" / f"cam_{serials[1]}.mp4").unlink()
    report = ingest_sequence(capture_copy, str(tmp_path), IngestConfig(cameras=serials[2:]))
    assert report["cameras"] == serials[2:]
    assert any(serials[1] in w and "no video" in w for w in report["warnings"])


def test_missing_calibration_is_a_warning_and_empty_folder_an_error(capture_copy, tmp_path):
    (capture_copy.parent.parent / "calibration" / "camera_params.json").unlink()
    report = ingest_sequence(capture_copy, str(tmp_path), IngestConfig(count=1))
    assert report["calibrated"] is False and any("calibrate" in w for w in report["warnings"])
    for video in (capture_copy / "images").glob("*.mp4"):
        video.unlink()
    with pytest.raises(CaptureLayoutError, match="no camera videos"):
        ingest_sequence(capture_copy, str(tmp_path / "other"), IngestConfig())


def test_single_frame_cameras(tmp_path):
    single = synthesize_capture(tmp_path / "archive", cameras=2, frames=1, width=32, height=48)
    report = ingest_sequence(single.sequence_dir, str(tmp_path / "work"), IngestConfig())
    assert report["frames"] == 1


def test_cli_ingest_and_its_errors(capture, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(capture.sequence_dir), "--work", str(tmp_path), "--count", "2",
                                 "--cameras", ",".join(sorted(capture.video_paths)[:2])])
    assert result.exit_code == 0, result.output
    assert "completed" in result.output
    result = runner.invoke(app, ["ingest", str(capture.sequence_dir), "--work", str(tmp_path), "--cameras", "999"])
    assert result.exit_code == 1
    assert "999" in result.output and "Traceback" not in result.output
