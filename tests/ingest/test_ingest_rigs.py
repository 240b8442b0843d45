"""Ingest on other rigs: codecs, captures without plates, and bad rigs refused before anything is written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipeline.synthetic import synthesize_capture
from stages.core.cameras import CameraParams, look_at
from stages.core.errors import CaptureLayoutError
from stages.ingest.checks import FrameSizeError, RigError, check_cameras_see_subject, check_frame_memory
from stages.ingest.config import IngestConfig
from stages.ingest.stage import ingest_sequence
from storage import CaptureStore, SequenceWorkDir, config_hash

W, H = 48, 64


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("ring"), cameras=6, layout="ring", rows=2,
                              serial_format="{:02d}", plates=False, frames=2, width=W, height=H)


def _work(capture, root) -> SequenceWorkDir:
    return SequenceWorkDir.for_sequence(str(root), capture.participant_dir.name, capture.sequence_dir.name)


def test_every_codec_stores_the_same_frames_and_is_recorded(ring, tmp_path):
    frames, sizes = {}, {}
    for codec in ("zstd", "lz4", "none"):
        report = ingest_sequence(ring.sequence_dir, str(tmp_path / codec), IngestConfig(codec=codec, workers=1))
        store = CaptureStore.open(_work(ring, tmp_path / codec).capture_uri)
        assert report["codec"] == codec and store.attrs["codec"] == codec
        frames[codec] = np.asarray(store.frames[:])
        sizes[codec] = sum(f.stat().st_size for f in (tmp_path / codec).rglob("*") if f.is_file())
    assert np.array_equal(frames["zstd"], frames["lz4"]) and np.array_equal(frames["zstd"], frames["none"])
    assert sizes["zstd"] < sizes["none"] and sizes["lz4"] < sizes["none"]
    # lossless, so a knob: the config hash (and the archive ledger) ignore it, and a re-run skips
    assert config_hash(IngestConfig(codec="lz4").result_fields()) == config_hash(IngestConfig().result_fields())
    again = ingest_sequence(ring.sequence_dir, str(tmp_path / "zstd"), IngestConfig(codec="none", workers=1))
    assert again["status"] == "skipped"


def test_a_capture_without_plates_gets_one_summary_line(ring, tmp_path):
    report = ingest_sequence(ring.sequence_dir, str(tmp_path), IngestConfig(workers=1))
    plates = [w for w in report["warnings"] if "background plate" in w]
    assert len(plates) == 1 and plates[0].startswith("no background plates for 6/6 cameras")
    assert report["cameras_without_plate"] == ring.cameras and report["background_plates"] == 0


def _rewrite_calibration(capture, root, change) -> object:
    """A copy of the capture whose camera_params.json went through ``change(dict)``."""
    shutil.copytree(capture.root, root)
    path = root / capture.participant_dir.name / "calibration" / "camera_params.json"
    params = json.loads(path.read_text())
    change(params)
    path.write_text(json.dumps(params))
    return root / capture.participant_dir.name / "sequences" / capture.sequence_dir.name


def _nothing_written(work_root) -> bool:
    return not any(work_root.rglob("zarr.json")) if work_root.exists() else True


def test_a_calibration_for_another_image_size_is_refused_naming_the_camera(ring, tmp_path):
    def double(params):  # K for frames twice as large as the videos
        for k in params["intrinsics"].values():
            k[0][0], k[1][1], k[0][2], k[1][2] = (2 * k[0][0], 2 * k[1][1], 2 * k[0][2], 2 * k[1][2])

    sequence = _rewrite_calibration(ring, tmp_path / "archive", double)
    with pytest.raises(CaptureLayoutError, match=r"camera 00's principal point .* 48x64 frames.*--calibration-size"):
        ingest_sequence(sequence, str(tmp_path / "work"))
    assert _nothing_written(tmp_path / "work")
    report = ingest_sequence(sequence, str(tmp_path / "work"), IngestConfig(calibration_size=(2 * W, 2 * H)))
    assert report["status"] == "completed"


def test_a_calibration_size_of_another_aspect_ratio_is_refused_naming_the_value(ring, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(CaptureLayoutError, match=rf"--calibration-size {2 * H} {2 * W}: .*camera 00.* is {W}x{H}\) "
                                                 r"\(width and height swapped\?\)"):
        ingest_sequence(ring.sequence_dir, str(work), IngestConfig(calibration_size=(2 * H, 2 * W)))
    with pytest.raises(CaptureLayoutError, match=rf"--calibration-size {2 * W} {H}: .*aspect ratio"):
        ingest_sequence(ring.sequence_dir, str(work), IngestConfig(calibration_size=(2 * W, H)))
    assert _nothing_written(work)


def test_a_rig_that_looks_away_from_the_subject_is_refused(ring, tmp_path):
    def outward(params):  # every camera turned round: they look away from the head
        for serial, matrix in params["world_2_cam"].items():
            pose = np.asarray(matrix)
            centre = -pose[:3, :3].T @ pose[:3, 3]
            params["world_2_cam"][serial] = look_at(centre, 2 * centre).tolist()

    sequence = _rewrite_calibration(ring, tmp_path / "archive", outward)
    with pytest.raises(RigError, match=r"only 0 of 6 cameras see .*camera 00: behind it"):
        ingest_sequence(sequence, str(tmp_path / "work"))
    assert _nothing_written(tmp_path / "work")


def test_a_single_camera_is_refused_by_name(ring, tmp_path):
    with pytest.raises(RigError, match=r"at least 2 cameras .* has 1 \(camera 03\)"):
        ingest_sequence(ring.sequence_dir, str(tmp_path), IngestConfig(cameras=["03"]))
    assert _nothing_written(tmp_path)


def test_one_camera_looking_away_is_a_warning_not_an_error():
    eyes = [np.array([np.sin(a), 0.0, np.cos(a)]) for a in (-0.5, 0.0, 0.5)]
    world_2_cam = {str(i): look_at(eye, np.zeros(3)) for i, eye in enumerate(eyes)}
    world_2_cam["2"] = look_at(eyes[2], 2 * eyes[2])
    K = np.array([[100.0, 0, 32], [0, 100.0, 48], [0, 0, 1]])
    params = CameraParams(world_2_cam=world_2_cam, intrinsics={s: K for s in world_2_cam}, shared_intrinsics=False)
    warnings: list[str] = []
    check_cameras_see_subject(params, ["0", "1", "2"], (64, 96), warnings)
    assert len(warnings) == 1 and "camera 2 behind it" in warnings[0]


def test_frames_too_large_for_memory_or_one_chunk_are_refused_by_camera_and_size():
    need = check_frame_memory("07", (1100, 1604), (1100, 1604), workers=16, available=64 * 2**30)
    assert need < 4 * 2**30
    with pytest.raises(FrameSizeError, match=r"camera 07: frames of 2200x3208 .* 16 decoders .* --workers"):
        check_frame_memory("07", (2200, 3208), (2200, 3208), workers=16, available=2 * 2**30)
    with pytest.raises(FrameSizeError, match=r"camera 07: a stored frame of 40000x20000"):
        check_frame_memory("07", (40000, 20000), (40000, 20000), workers=1, available=2**50)
