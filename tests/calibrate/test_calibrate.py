"""Calibrate on small synthetic captures, with real pycolmap and real zarr.

The accuracy bounds of the issue (every camera registered, median rotation error < 0.2 deg, median centre
error < 2 mm, reprojection < 0.5 px) are asserted on 12 cameras x 3 frames: with 8 cameras x 4 frames the
rotation error sits at ~0.16-0.23 deg depending on the alignment and seed, too close to the bound for a test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pycolmap
import pytest
import zarr
from typer.testing import CliRunner

from stages.core.cameras import camera_center, invert_pose, look_at, opengl_to_opencv, read_camera_params
from pipeline.cli import app
from stages.calibrate.config import CalibrateConfig
from stages.ingest.config import IngestConfig
from stages.core.errors import CalibrationError, StageOrderError
from pipeline.synthetic import synthesize_capture
from stages.calibrate import colmap
from stages.core.bookkeeping import upstream_digest
from stages.calibrate.stage import PROVIDED_ATTR, calibrate_sequence, select_timesteps
from stages.calibrate.geometry import (
    Similarity,
    align_to,
    focal_problem,
    geometry_problems,
    metric_frame,
    pose_differences,
    subject_center,
    umeyama,
)
from stages.ingest.stage import ingest_sequence
from storage import CaptureStore, SequenceWorkDir, StageRecord

CAMERAS, FRAMES = 12, 3


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("archive"), cameras=CAMERAS, frames=FRAMES)


@pytest.fixture(scope="module")
def truth(capture):
    return read_camera_params(capture.calibration_path)


def _ingest(sequence_dir: Path, root: Path, **options) -> SequenceWorkDir:
    report = ingest_sequence(sequence_dir, str(root), IngestConfig(**options))
    return SequenceWorkDir.for_sequence(str(root), report["participant"], report["sequence"])


def _uncalibrated_copy(capture, root: Path) -> Path:
    """The archive without camera_params.json: a capture nobody calibrated."""
    shutil.copytree(capture.root, root)
    (root / capture.participant_dir.name / "calibration" / "camera_params.json").unlink()
    return root / capture.participant_dir.name / "sequences" / capture.sequence_dir.name


def _errors(estimate: dict, reference: dict) -> tuple[float, float]:
    """Median rotation (deg) and centre (mm) error after similarity alignment."""
    aligned = align_to(estimate, reference).apply_poses(estimate)
    differences = pose_differences(aligned, reference)
    return (float(np.median([d["rotation_deg"] for d in differences.values()])),
            float(np.median([d["center_mm"] for d in differences.values()])))


def _calibrate_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("calibrate-*")}


# --- the colmap mode ------------------------------------------------------------------------------------


def test_colmap_registers_every_camera_within_the_bounds_and_writes_readable_files(capture, truth, tmp_path):
    work = _ingest(capture.sequence_dir, tmp_path)
    before = _calibrate_dirs()
    report = calibrate_sequence(work.uri, CalibrateConfig(mode="colmap"))
    assert _calibrate_dirs() <= before  # the COLMAP workspace is gone

    assert report["status"] == "completed" and report["solution"] == "colmap"
    assert report["registered_cameras"] == CAMERAS and report["failed_cameras"] == []
    assert report["against_provided"]["rotation_deg"]["median"] < 0.2
    assert report["against_provided"]["center_mm"]["median"] < 2.0
    assert report["reprojection_error_px"]["mean"] < 0.5
    assert report["points"] > 500
    assert set(report["timings_s"]) >= {"extract", "match", "map", "ba", "total"}
    for entry in report["cameras"].values():
        assert entry["registered"] and entry["observations"] >= 50 and entry["reprojection_error_median_px"] < 0.5

    store = CaptureStore.open(work.capture_uri)
    reference = {s: truth.world_2_cam[s] for s in store.cameras}
    rotation, centre = _errors(store.world_2_cam, reference)  # measured here, not taken from the report
    assert rotation < 0.2 and centre < 2.0
    # written in the provided calibration's frame, so no alignment is needed to be close
    direct = pose_differences(store.world_2_cam, reference)
    assert max(d["center_mm"] for d in direct.values()) < 10.0
    for serial in store.cameras:  # intrinsics were kept from the provided K (default --focal auto)
        np.testing.assert_allclose(store.intrinsics[serial], truth.intrinsics[serial], atol=1e-6)

    model = pycolmap.Reconstruction(str(tmp_path / "001" / "EXP-1-head" / "calibration" / "colmap"))
    assert model.num_reg_images() == CAMERAS and model.num_points3D() == report["points"]
    for image in model.images.values():
        serial = colmap.serial_of(image.name)
        np.testing.assert_allclose(image.cam_from_world().matrix(), store.world_2_cam[serial][:3, :4], atol=1e-9)
        np.testing.assert_allclose(model.cameras[image.camera_id].calibration_matrix(), store.intrinsics[serial],
                                   atol=1e-9)

    transforms = json.loads((tmp_path / "001" / "EXP-1-head" / "calibration" / "transforms.json").read_text())
    assert len(transforms["frames"]) == CAMERAS * FRAMES
    assert [f["time"] for f in transforms["frames"][:FRAMES]] == [0.0, 0.5, 1.0]
    frame = transforms["frames"][FRAMES]
    cam_2_world = opengl_to_opencv(np.array(frame["transform_matrix"]))
    np.testing.assert_allclose(invert_pose(cam_2_world), store.world_2_cam[frame["camera"]], atol=1e-9)
    assert frame["fl_x"] == pytest.approx(store.intrinsics[frame["camera"]][0, 0])

    again = calibrate_sequence(work.uri, CalibrateConfig(mode="colmap"))
    assert again["status"] == "skipped"


# --- provided and refine --------------------------------------------------------------------------------


def test_provided_is_the_default_and_rescales_K_with_the_stored_size(capture, truth, tmp_path):
    work = _ingest(capture.sequence_dir, tmp_path, downscale=2, count=2)
    report = calibrate_sequence(work.uri)
    assert report["status"] == "completed" and report["resolved_mode"] == "provided"
    assert report["registered_cameras"] == CAMERAS
    store = CaptureStore.open(work.capture_uri)
    for serial in store.cameras:
        np.testing.assert_allclose(store.intrinsics[serial][:2], truth.intrinsics[serial][:2] / 2)
        np.testing.assert_allclose(store.world_2_cam[serial], truth.world_2_cam[serial])
    model = pycolmap.Reconstruction(work.path("calibration", "colmap"))
    assert model.num_images() == CAMERAS and model.num_points3D() == 0
    camera = next(iter(model.cameras.values()))
    assert (camera.width, camera.height) == (store.width, store.height)
    assert calibrate_sequence(work.uri)["status"] == "skipped"
    record = store.stage_record("calibrate")
    assert record is not None and record.report["solution"] == "provided"


def _perturb(poses: dict, rng: np.random.Generator, degrees: float, metres: float) -> dict:
    out = {}
    for serial, pose in poses.items():
        axis = rng.normal(size=3)
        rotation = cv2.Rodrigues(axis / np.linalg.norm(axis) * np.radians(degrees))[0]
        moved = pose.copy()
        moved[:3, :3] = rotation @ pose[:3, :3]
        moved[:3, 3] += rng.normal(size=3) * metres
        out[serial] = moved
    return out


def test_refine_moves_a_perturbed_calibration_back_and_reports_the_motion(capture, truth, tmp_path):
    work = _ingest(capture.sequence_dir, tmp_path)
    store = CaptureStore.open(work.capture_uri, mode="r+")
    # perturb what ingest provided, before calibrate first keeps a copy of it
    perturbed = _perturb(store.world_2_cam, np.random.default_rng(5), degrees=0.25, metres=0.004)
    store.set_calibration(store.intrinsics, perturbed)
    reference = {s: truth.world_2_cam[s] for s in store.cameras}
    rotation_before, centre_before = _errors(perturbed, reference)

    report = calibrate_sequence(work.uri, CalibrateConfig(mode="refine"))
    assert report["status"] == "completed" and report["solution"] == "refine"
    rotation_after, centre_after = _errors(CaptureStore.open(work.capture_uri).world_2_cam, reference)
    assert rotation_after < 0.6 * rotation_before and centre_after < 0.5 * centre_before
    assert rotation_after < 0.2 and centre_after < 2.0
    motion = report["motion"]
    assert 0.5 * rotation_before < motion["rotation_deg"]["median"] < 2.0 * rotation_before
    assert 0.5 * centre_before < motion["center_mm"]["median"] < 2.0 * centre_before
    assert all(entry["moved_deg"] > 0 and entry["moved_mm"] > 0 for entry in report["cameras"].values())
    kept = CaptureStore.open(work.capture_uri).attrs[PROVIDED_ATTR]["world_2_cam"]
    np.testing.assert_allclose(kept[store.cameras[0]], perturbed[store.cameras[0]])  # the copy is what was provided


# --- bad input ------------------------------------------------------------------------------------------


def _flatten_frames(work: SequenceWorkDir) -> None:
    store = CaptureStore.open(work.capture_uri, mode="r+")
    flat = np.full((store.n_frames, store.height, store.width, 3), 128, np.uint8)
    for index in range(store.n_cameras):
        store.write_frames(index, 0, flat)


def test_a_capture_without_texture_falls_back_to_the_provided_calibration(capture, truth, tmp_path):
    work = _ingest(capture.sequence_dir, tmp_path, count=2, cameras=capture.cameras[:4])
    _flatten_frames(work)
    report = calibrate_sequence(work.uri, CalibrateConfig(mode="colmap"))
    assert report["status"] == "fallback" and report["solution"] == "provided"
    assert report["failed_cameras"] == sorted(capture.cameras[:4]) and report["registered_cameras"] == 0
    assert all("not registered" in " ".join(e["problems"]) or "COLMAP" in " ".join(e["problems"])
               for e in report["cameras"].values())
    assert any("fell back" in w for w in report["warnings"])
    store = CaptureStore.open(work.capture_uri)
    for serial in store.cameras:
        np.testing.assert_allclose(store.world_2_cam[serial], truth.world_2_cam[serial])
    assert json.loads(Path(work.report_uri("calibrate")).read_text())["status"] == "fallback"


def test_a_capture_without_texture_or_calibration_is_an_error_and_writes_nothing(capture, tmp_path):
    sequence_dir = _uncalibrated_copy(capture, tmp_path / "archive")
    work = _ingest(sequence_dir, tmp_path / "work", count=1, cameras=capture.cameras[:3])
    _flatten_frames(work)
    with pytest.raises(CalibrationError, match="not registered"):
        calibrate_sequence(work.uri)
    store = CaptureStore.open(work.capture_uri)
    assert store.intrinsics is None and store.world_2_cam is None
    assert store.stage_record("calibrate") is None
    assert json.loads(Path(work.report_uri("calibrate")).read_text())["status"] == "failed"
    with pytest.raises(CalibrationError, match="--mode colmap"):
        calibrate_sequence(work.uri, CalibrateConfig(mode="refine"))


def test_single_frame_cameras_without_calibration_get_a_metric_frame(capture, truth, tmp_path):
    sequence_dir = _uncalibrated_copy(capture, tmp_path / "archive")
    work = _ingest(sequence_dir, tmp_path / "work", count=1)
    report = calibrate_sequence(work.uri)  # auto: nothing provided, so colmap
    assert report["status"] == "completed" and report["solution"] == "colmap"
    assert report["registered_cameras"] == CAMERAS and "against_provided" not in report
    store = CaptureStore.open(work.capture_uri)
    centres = np.array([camera_center(p) for p in store.world_2_cam.values()])
    assert np.median(np.linalg.norm(centres, axis=1)) == pytest.approx(1.0)  # subject at the origin, 1 m away
    assert np.linalg.norm(subject_center(store.world_2_cam)) < 1e-9
    reference = {s: truth.world_2_cam[s] for s in store.cameras}
    rotation, centre = _errors(store.world_2_cam, reference)
    assert rotation < 1.0 and centre < 60.0  # focal lengths are estimated here, so looser than with a K
    focal_errors = [abs(store.intrinsics[s][0, 0] / truth.intrinsics[s][0, 0] - 1) for s in store.cameras]
    assert np.median(focal_errors) < 0.1
    up = np.mean([invert_pose(p)[:3, 1] for p in store.world_2_cam.values()], axis=0)
    assert up[1] < -0.9  # camera y (down) points to world -y: world y is up, as in the synthetic world

    shared = calibrate_sequence(work.uri, CalibrateConfig(shared_intrinsics=True))
    assert shared["status"] == "completed" and shared["registered_cameras"] == CAMERAS
    store = CaptureStore.open(work.capture_uri)
    first = store.intrinsics[store.cameras[0]]
    assert all(np.array_equal(store.intrinsics[s], first) for s in store.cameras)
    assert len(pycolmap.Reconstruction(work.path("calibration", "colmap")).cameras) == 1


def test_masks_need_the_matte_stage(capture, tmp_path):
    work = _ingest(capture.sequence_dir, tmp_path, count=1, cameras=capture.cameras[:3])
    with pytest.raises(StageOrderError, match="matte"):
        calibrate_sequence(work.uri, CalibrateConfig(mode="colmap", use_masks=True))


def test_masks_from_the_matte_stage_restrict_features_and_enter_the_digest(capture, tmp_path):
    work = _ingest(capture.sequence_dir, tmp_path, count=1)
    store = CaptureStore.open(work.capture_uri, mode="r+")
    truth_alpha = zarr.open_group(capture.ground_truth_uri, mode="r")["alpha"]
    for index in range(store.n_cameras):  # the exact matte stands in for the matte stage's output
        store.write_alpha(index, 0, truth_alpha[index, 0])
    store.write_stage_record(StageRecord(stage="matte", version="test", config_hash="exact"))
    report = calibrate_sequence(work.uri, CalibrateConfig(mode="colmap", use_masks=True))
    assert report["status"] == "completed" and report["masks"] and report["registered_cameras"] == CAMERAS
    coverage = np.mean([np.asarray(truth_alpha[i, 0]) > 127 for i in range(CAMERAS)])
    assert coverage < 0.8  # so the masks did take features away
    assert calibrate_sequence(work.uri, CalibrateConfig(mode="colmap", use_masks=True))["status"] == "skipped"
    record = store.stage_record("calibrate")
    assert record.input_digest == upstream_digest(store, "ingest", "matte")
    store.write_stage_record(StageRecord(stage="matte", version="test", config_hash="another"))
    assert upstream_digest(store, "ingest", "matte") != record.input_digest  # a new matte reruns calibrate


def test_exported_masks_are_eroded_and_named_the_colmap_way(capture, tmp_path):
    work = _ingest(capture.sequence_dir, tmp_path / "work", count=2, cameras=capture.cameras[:2])
    store = CaptureStore.open(work.capture_uri, mode="r+")
    alpha = np.zeros((store.height, store.width), np.uint8)
    alpha[100:200, 50:150] = 255
    store.write_alpha(0, 1, alpha)
    store.write_alpha(1, 1, np.zeros_like(alpha))  # every exported view needs its matte (missing ones are refused)
    workspace = colmap.Workspace(tmp_path / "ws", store.cameras, [1], use_masks=True)
    colmap.export_frames(store, workspace, erode_px=3)
    serial = store.cameras[0]
    mask = cv2.imread(str(workspace.masks / f"{workspace.frame_name(serial, 1)}.png"), cv2.IMREAD_GRAYSCALE)
    assert mask[103:197, 53:147].min() == 255 and mask[100:200, 50:150].mean() < 255
    assert mask[:100].max() == 0
    frame = cv2.imread(str(workspace.images / workspace.frame_name(serial, 1)))[..., ::-1]
    np.testing.assert_array_equal(frame, store.read_frame(0, 1))
    assert (workspace.images / colmap.image_name(serial)).exists()


def test_cli_calibrate(capture, tmp_path):
    work = _ingest(capture.sequence_dir, tmp_path, count=1, cameras=capture.cameras[:3])
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", work.uri, "--mode", "provided"])
    assert result.exit_code == 0, result.output
    assert "calibrate completed: provided calibration, 3/3 cameras" in result.output
    bad = runner.invoke(app, ["calibrate", work.uri, "--mode", "sfm"])
    assert bad.exit_code == 1 and "--mode" in bad.output
    missing = runner.invoke(app, ["calibrate", str(tmp_path / "001" / "nothing")])
    assert missing.exit_code == 1 and "ingest" in missing.output


# --- geometry units -------------------------------------------------------------------------------------


def _rig(n: int = 6) -> dict:
    angles = np.radians(np.linspace(-50, 50, n))
    return {f"c{i}": look_at([np.sin(a), 0.1 * (i % 2), np.cos(a)], [0.0, 0.0, 0.0]) for i, a in enumerate(angles)}


def test_umeyama_and_alignment_recover_a_similarity():
    rig = _rig()
    known = Similarity(0.37, cv2.Rodrigues(np.array([0.2, -0.5, 0.9]))[0], np.array([0.3, -1.0, 2.0]))
    moved = known.apply_poses(rig)
    for serial in rig:  # the camera centre moves like a point
        np.testing.assert_allclose(camera_center(moved[serial]), known.apply_points(camera_center(rig[serial])))
    recovered = align_to(moved, rig)
    differences = pose_differences(recovered.apply_poses(moved), rig)
    assert max(d["rotation_deg"] for d in differences.values()) < 1e-6
    assert max(d["center_mm"] for d in differences.values()) < 1e-6
    points = np.random.default_rng(0).normal(size=(10, 3))
    fitted = umeyama(points, known.apply_points(points))
    assert fitted.scale == pytest.approx(known.scale) and np.allclose(fitted.rotation, known.rotation)
    with pytest.raises(ValueError, match="collinear"):
        umeyama(np.outer(np.arange(4.0), [1, 2, 3]), np.outer(np.arange(4.0), [1, 2, 3]))


def test_metric_frame_centres_scales_and_orients_the_rig():
    rig = _rig()
    shuffle = Similarity(3.0, cv2.Rodrigues(np.array([1.0, 0.4, -0.3]))[0], np.array([5.0, 1.0, -2.0]))
    shuffled = shuffle.apply_poses(rig)
    normalised = metric_frame(shuffled, subject_distance=1.5).apply_poses(shuffled)
    centres = np.array([camera_center(p) for p in normalised.values()])
    assert np.median(np.linalg.norm(centres, axis=1)) == pytest.approx(1.5)
    assert np.linalg.norm(subject_center(normalised)) < 1e-9
    assert centres[:, 2].min() > 0  # cameras sit on the +z side


def test_sanity_checks_catch_degenerate_cameras():
    rig = _rig()
    backwards = dict(rig)
    backwards["c0"] = look_at(camera_center(rig["c0"]), 2 * camera_center(rig["c0"]))  # looks away from the subject
    problems = geometry_problems(backwards)
    assert any("behind" in p for p in problems["c0"]) and not problems["c3"]
    duplicate = dict(rig, c1=rig["c0"].copy())
    assert any("coincides" in p for p in geometry_problems(duplicate)["c1"])
    assert focal_problem(500.0, 800.0, (220, 320), 0.2) is not None
    assert focal_problem(790.0, 800.0, (220, 320), 0.2) is None
    assert focal_problem(10.0, None, (220, 320), 0.2) is not None


def test_select_timesteps_spreads_over_the_sequence():
    assert select_timesteps(24, 8) == [0, 3, 7, 10, 13, 16, 20, 23]
    assert select_timesteps(3, 8) == [0, 1, 2]
    assert select_timesteps(1, 8) == [0]
