"""Matting on a small synthetic capture (real rembg + u2netp, real zarr stores) and its building blocks.

The capture is synthesised and ingested once per module; every test that changes a store works on a copy.
Model inference is the slow part (~0.5-2 s a frame on 2 cores), so only the method-quality tests and the
plate fallback run it over the whole capture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from pipeline.cli import app
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.core.errors import StageOrderError
from stages.matte.models import u2netp_path
from pipeline.synthetic import synthesize_capture
from stages.ingest.stage import ingest_sequence
from stages.matte.stage import PREVIEW_PATH, MattingError, matte_sequence
from stages.matte.methods import MAX_PLATE_NOISE, matte_fused, matte_saliency
from stages.matte.model import ModelMissingError, load_session, locate_model, saliency
from stages.matte.plate import to_float
from stages.matte.refine import enclosed_holes, fill_holes, guided_filter, sliding_window, temporal_filter
from storage import CaptureStore, SequenceWorkDir

CAMERAS, FRAMES, WIDTH, HEIGHT = 4, 3, 110, 160
IOU_BOUNDS = {"fused": 0.97, "plate": 0.95, "rembg": 0.75}


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("archive"), cameras=CAMERAS, frames=FRAMES, width=WIDTH,
                              height=HEIGHT, seed=1)


@pytest.fixture(scope="module")
def ingested(capture, tmp_path_factory) -> Path:
    """The pristine ingested sequence folder; copy it before changing anything."""
    root = tmp_path_factory.mktemp("work")
    ingest_sequence(capture.sequence_dir, str(root), IngestConfig())
    return root / capture.participant_dir.name / capture.sequence_dir.name


def _copy(sequence: Path, tmp_path: Path) -> Path:
    target = tmp_path / "work" / sequence.parent.name / sequence.name
    shutil.copytree(sequence, target)
    return target


def _ious(sequence: Path, capture) -> dict[str, list[float]]:
    """Per camera, the IoU (alpha > 0.5) of every frame against the ground truth."""
    store = CaptureStore.open(str(sequence / "capture.zarr"))
    truth = zarr.open_group(capture.ground_truth_uri, mode="r")
    truth_cameras = list(truth.attrs["cameras"])
    out = {}
    for c, serial in enumerate(store.cameras):
        want = np.asarray(truth["alpha"][truth_cameras.index(serial)]) > 127
        got = np.asarray(store.alpha[c]) > 127
        out[serial] = [float((g & w).sum() / (g | w).sum()) for g, w in zip(got, want)]
    return out


@pytest.fixture(scope="module")
def matted(ingested, capture, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each method run once on its own copy of the sequence: method -> (sequence folder, report)."""
    out = {}
    for method in ("fused", "plate", "rembg"):
        sequence = _copy(ingested, tmp_path_factory.mktemp(method))
        out[method] = (sequence, matte_sequence(sequence, MatteConfig(method=method)))
    return out


# --- the stage on the synthetic capture --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fused", "plate", "rembg"])
def test_each_method_meets_its_iou_bound(matted, capture, method):
    sequence, report = matted[method]
    ious = _ious(sequence, capture)
    mean = float(np.mean([v for per_camera in ious.values() for v in per_camera]))
    assert mean >= IOU_BOUNDS[method], (method, ious)
    assert {c["method"] for c in report["cameras"].values()} == {method}


def test_fused_is_at_least_as_good_as_either_cue(matted, capture):
    means = {m: np.mean([v for vs in _ious(matted[m][0], capture).values() for v in vs]) for m in matted}
    assert means["fused"] >= max(means["plate"], means["rembg"]) - 0.002, means


def test_report_record_preview_and_soft_edges(matted):
    sequence, report = matted["fused"]
    assert report["status"] == "completed" and report["method"] == "fused"
    assert set(report["cameras"]) == set(CaptureStore.open(str(sequence / "capture.zarr")).cameras)
    for camera in report["cameras"].values():
        assert 0.2 < camera["coverage"] < 0.7 and camera["fps"] > 0 and camera["frames"] == FRAMES
    assert report["frames_per_second"] > 0 and report["seconds"] > 0 and report["warnings"] == []
    on_disk = json.loads((sequence / "reports" / "matte.json").read_text())
    assert on_disk["config_hash"] == report["config_hash"]
    store = CaptureStore.open(str(sequence / "capture.zarr"))
    assert store.stage_record("matte").config_hash == report["config_hash"]
    preview = cv2.imread(str(sequence / PREVIEW_PATH))
    assert preview is not None and preview.shape[0] > HEIGHT * 2 and preview.shape[1] > WIDTH * 3 * FRAMES
    alpha = np.asarray(store.alpha[0, 1])
    mask = (alpha > 127).astype(np.uint8)
    kernel = np.ones((7, 7), np.uint8)
    near_edge = cv2.dilate(mask, kernel) != cv2.erode(mask, kernel)
    soft = (alpha > 0) & (alpha < 255)
    assert ((alpha > 25) & (alpha < 230)).any()  # soft edges ...
    assert (soft & ~near_edge).mean() < 1e-3  # ... only at edges: no haze on the backdrop, no holes in the subject


def test_rerun_is_skipped_and_another_config_reruns(matted, tmp_path):
    sequence = _copy(matted["plate"][0], tmp_path)
    again = matte_sequence(sequence, MatteConfig(method="plate"))
    assert again["status"] == "skipped"
    other = matte_sequence(sequence, MatteConfig(method="plate", temporal_radius=0))
    assert other["status"] == "completed"


def test_missing_plate_falls_back_to_rembg_with_a_warning(ingested, capture, tmp_path):
    sequence = _copy(ingested, tmp_path)
    store = CaptureStore.open(str(sequence / "capture.zarr"), mode="r+")
    serial = store.cameras[1]
    store.write_background(1, np.zeros((HEIGHT, WIDTH, 3), np.uint8))  # what ingest stores for "no plate"
    report = matte_sequence(sequence, MatteConfig(method="plate"))
    assert report["cameras"][serial]["method"] == "rembg" and report["cameras"][serial]["plate"] is None
    assert [c["method"] for s, c in report["cameras"].items() if s != serial] == ["plate"] * (CAMERAS - 1)
    assert any(serial in w and "rembg" in w for w in report["warnings"])
    assert np.mean(_ious(sequence, capture)[serial]) >= IOU_BOUNDS["rembg"]


def test_shading_change_between_plate_and_take(ingested, capture, tmp_path):
    """Brighter on one side, darker on the other (a light drifted): the gain map absorbs it."""
    sequence = _copy(ingested, tmp_path)
    store = CaptureStore.open(str(sequence / "capture.zarr"), mode="r+")
    ramp = np.linspace(0.8, 1.15, WIDTH)[None, :, None]
    for c in range(CAMERAS):
        frames = store.read_frames(c).astype(np.float64)
        store.write_frames(c, 0, np.clip(frames * ramp, 0, 255).astype(np.uint8))
    matte_sequence(sequence, MatteConfig(method="plate"))
    assert np.mean([v for vs in _ious(sequence, capture).values() for v in vs]) >= IOU_BOUNDS["plate"] - 0.01


def test_missing_model_is_a_clear_error_before_anything_is_written(ingested, tmp_path):
    sequence = _copy(ingested, tmp_path)
    for model in ("u2net", str(tmp_path / "nowhere" / "model.onnx")):
        with pytest.raises(ModelMissingError, match="install-models") as error:
            matte_sequence(sequence, MatteConfig(method="rembg", model=model))
        assert "make install" in str(error.value)
    assert not (u2netp_path().parent / "models" / "u2net").exists()  # nothing was downloaded
    store = CaptureStore.open(str(sequence / "capture.zarr"))
    assert not store.alpha.stored_chunks() and store.stage_record("matte") is None  # no alpha chunk written


def test_plate_only_cameras_do_not_need_the_model(ingested, tmp_path):
    sequence = _copy(ingested, tmp_path)
    report = matte_sequence(sequence, MatteConfig(method="plate", model="not-installed"))
    assert report["model"] is None and report["status"] == "completed"
    store = CaptureStore.open(str(sequence / "capture.zarr"), mode="r+")
    store.write_background(2, np.zeros((HEIGHT, WIDTH, 3), np.uint8))
    with pytest.raises(ModelMissingError, match=store.cameras[2]):
        matte_sequence(sequence, MatteConfig(method="plate", model="not-installed"))


def test_store_without_ingest_is_a_stage_order_error(tmp_path):
    with pytest.raises(StageOrderError, match="ingest"):
        matte_sequence(tmp_path / "001" / "SEQ")
    assert not (tmp_path / "001").exists()  # the lock did not create the folder
    work = SequenceWorkDir(str(tmp_path / "002" / "SEQ"))
    CaptureStore.create(work.capture_uri, cameras=["a"], n_frames=1, height=8, width=8, fps=1.0, frame_indices=[0],
                        intrinsics=None, world_2_cam=None)
    with pytest.raises(StageOrderError, match="ingest"):
        matte_sequence(work)


def test_failure_mid_way_names_the_camera_and_keeps_other_cameras_alpha(matted, tmp_path):
    sequence = _copy(matted["fused"][0], tmp_path)
    before = np.asarray(CaptureStore.open(str(sequence / "capture.zarr")).alpha)
    chunk = sequence / "capture.zarr" / "frames" / "c" / "0" / "1" / "0" / "0" / "0"
    chunk.write_bytes(b"not a compressed chunk")
    with pytest.raises(MattingError) as error:
        matte_sequence(sequence, MatteConfig(method="plate", workers=1))
    store = CaptureStore.open(str(sequence / "capture.zarr"))
    assert store.cameras[0] in str(error.value)
    assert store.stage_record("matte") is None
    np.testing.assert_array_equal(np.asarray(store.alpha[1:]), before[1:])  # cameras not reached: untouched
    assert json.loads((sequence / "reports" / "matte.json").read_text())["status"] == "failed"


def test_user_plate_folder_wrong_sizes_and_a_plate_from_elsewhere(ingested, capture, tmp_path):
    sequence = _copy(ingested, tmp_path)
    store = CaptureStore.open(str(sequence / "capture.zarr"))
    plates = tmp_path / "plates"
    plates.mkdir()
    first, second, third, fourth = store.cameras
    bgr = [np.ascontiguousarray(store.read_background(i)[..., ::-1]) for i in (0, 1)]
    cv2.imwrite(str(plates / f"image_{first}.png"), cv2.resize(bgr[0], (WIDTH * 2, HEIGHT * 2)))  # same aspect
    cv2.imwrite(str(plates / f"image_{second}.png"), cv2.resize(bgr[1], (WIDTH, WIDTH)))  # another aspect
    cv2.imwrite(str(plates / f"image_{third}.jpg"), np.full((HEIGHT, WIDTH, 3), 128, np.uint8))  # not this backdrop
    report = matte_sequence(sequence, MatteConfig(method="plate", plate_dir=str(plates)))
    assert report["cameras"][first]["plate"] == "file" and report["cameras"][second]["plate"] == "store"
    warnings = "\n".join(report["warnings"])
    assert f"camera {first} is {WIDTH * 2}x{HEIGHT * 2}, resized" in warnings
    assert f"camera {second} is {WIDTH}x{WIDTH}" in warnings and "ignored" in warnings
    assert f"camera {third}: the plate matches the backdrop poorly" in warnings
    assert f"camera {fourth}: no image_" in warnings
    assert np.mean(_ious(sequence, capture)[first]) >= IOU_BOUNDS["plate"]


def test_cli_matte(ingested, tmp_path):
    sequence = _copy(ingested, tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["matte", str(sequence), "--method", "plate"])
    assert result.exit_code == 0, result.output
    assert "completed" in result.output and "preview" in result.output
    result = runner.invoke(app, ["matte", str(sequence), "--method", "bogus"])
    assert result.exit_code == 1 and "--method" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["matte", str(tmp_path / "empty" / "SEQ")])
    assert result.exit_code == 1 and "ingest" in result.output


# --- the model ---------------------------------------------------------------------------------------------


def test_model_by_path_outside_the_models_folder(ingested, tmp_path):
    """A U2-Net ONNX anywhere on disk works (rembg alone only accepts files inside its folder)."""
    copy = tmp_path / "elsewhere" / "my-u2netp.onnx"
    copy.parent.mkdir()
    shutil.copy(locate_model("u2netp").path, copy)
    spec = locate_model(str(copy))
    assert spec.path == copy.resolve() and spec.name == "u2net_custom"
    frame = CaptureStore.open(str(ingested / "capture.zarr")).read_frame(0, 0)
    mask = saliency(load_session(spec, threads=1), frame)
    assert mask.shape == frame.shape[:2] and mask.dtype == np.float32 and 0.2 < (mask > 0.5).mean() < 0.8


def test_fused_lets_the_model_decide_where_the_plate_does_not_fit(ingested, capture):
    store = CaptureStore.open(str(ingested / "capture.zarr"))
    frame = store.read_frame(0, 1)
    grey_plate = np.full_like(frame, 128)  # e.g. a plate shot with the backdrop taken down
    probability = saliency(load_session(locate_model("u2netp"), threads=1), frame)
    config = MatteConfig()
    fused = matte_fused(to_float(frame), grey_plate, probability, config)
    assert fused.noise > MAX_PLATE_NOISE  # the report turns this into a warning naming the camera
    np.testing.assert_array_equal(fused.alpha, matte_saliency(to_float(frame), probability, config).alpha)
    truth = zarr.open_group(capture.ground_truth_uri, mode="r")
    want = truth["alpha"][list(truth.attrs["cameras"]).index(store.cameras[0]), 1] > 127
    got = fused.alpha > 0.5
    assert (got & want).sum() / (got | want).sum() >= IOU_BOUNDS["rembg"]


# --- building blocks -----------------------------------------------------------------------------------------


def test_sliding_window_sees_each_neighbour_and_holds_few_items():
    seen = [(item, sorted(neighbours)) for item, neighbours in sliding_window(iter(range(5)), 1)]
    assert seen == [(0, [1]), (1, [0, 2]), (2, [1, 3]), (3, [2, 4]), (4, [3])]
    assert [n for _, n in sliding_window(iter([7]), 2)] == [[]]
    assert list(sliding_window(iter(range(3)), 0)) == [(0, []), (1, []), (2, [])]
    assert [sorted(n) for _, n in sliding_window(iter(range(4)), 2)] == [[1, 2], [0, 2, 3], [0, 1, 3], [1, 2]]


def test_temporal_filter_steadies_a_static_backdrop_but_not_a_moving_subject():
    rng = np.random.default_rng(0)
    backdrop = np.full((20, 20, 3), 0.4, np.float32)
    frames = [backdrop.copy() for _ in range(3)]
    frames[2][:, 10:] = 0.9  # the subject entered the right half in the last frame
    alphas = [np.clip(rng.normal(0.0, 0.05, (20, 20)), 0, 1).astype(np.float32) for _ in range(3)]
    alphas[2][:, 10:] = 1.0
    steady = temporal_filter(frames[1], alphas[1], [(frames[0], alphas[0]), (frames[2], alphas[2])], cutoff=0.1)
    assert steady[:, :8].std() < alphas[1][:, :8].std() * 0.8  # noise averaged on the static left half
    assert steady[:, 12:].max() < 0.2  # the subject in frame 2 does not bleed into frame 1


def test_fill_holes_only_fills_enclosed_regions():
    mask = np.zeros((30, 30), bool)
    mask[5:25, 5:25] = True
    mask[10:15, 10:15] = False  # enclosed hole
    mask[20:30, 14:16] = False  # a notch open to the border
    labels, _ = enclosed_holes(mask)
    assert labels[12, 12] > 0 and labels[27, 15] == 0
    assert fill_holes(mask, max_area=100)[12, 12] and not fill_holes(mask, max_area=10)[12, 12]
    support = np.zeros((30, 30), np.float32)
    support[10:15, 10:15] = 1.0
    assert fill_holes(mask, support=support)[12, 12] and not fill_holes(mask, support=support)[27, 15]


def test_guided_filter_snaps_a_blurry_mask_to_the_image_edge():
    guide = np.zeros((40, 40, 3), np.float32)
    guide[:, 20:] = 1.0
    blurry = cv2.GaussianBlur((np.arange(40) >= 23).astype(np.float32)[None].repeat(40, 0), (0, 0), 3)
    out = guided_filter(guide, blurry, radius=4, eps=1e-4)
    jump_before, jump_after = blurry[0, 20] - blurry[0, 19], out[0, 20] - out[0, 19]
    assert jump_after > 0.3 and jump_after > 3 * jump_before  # the matte's edge moved onto the image's edge
    assert out[:, :19].max() < blurry[:, :19].max()


def test_guided_filter_equals_the_textbook_per_window_solve_and_leaves_its_inputs_alone():
    """The in-place arithmetic (issue 22) must still be He et al.'s filter, and must not write into the frame."""
    rng = np.random.default_rng(3)
    guide = cv2.GaussianBlur(rng.random((24, 20, 3), dtype=np.float32), (0, 0), 1.0)
    source = (rng.random((24, 20)) > 0.5).astype(np.float32)
    guide_before, source_before = guide.copy(), source.copy()
    radius, eps = 2, 1e-3
    out = guided_filter(guide, source, radius, eps)
    assert np.array_equal(guide, guide_before) and np.array_equal(source, source_before)
    padded_i = np.pad(guide.astype(np.float64), ((radius,) * 2, (radius,) * 2, (0, 0)), mode="symmetric")
    padded_p = np.pad(source.astype(np.float64), radius, mode="symmetric")
    h, w = source.shape
    coef_a, coef_b = np.zeros((h, w, 3)), np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            win_i = padded_i[y:y + 2 * radius + 1, x:x + 2 * radius + 1].reshape(-1, 3)
            win_p = padded_p[y:y + 2 * radius + 1, x:x + 2 * radius + 1].ravel()
            mu, mp = win_i.mean(0), win_p.mean()
            cov = (win_i - mu).T @ (win_i - mu) / len(win_p) + eps * np.eye(3)
            coef_a[y, x] = np.linalg.solve(cov, (win_i * win_p[:, None]).mean(0) - mu * mp)
            coef_b[y, x] = mp - coef_a[y, x] @ mu
    pa = np.pad(coef_a, ((radius,) * 2, (radius,) * 2, (0, 0)), mode="symmetric")
    pb = np.pad(coef_b, radius, mode="symmetric")
    expected = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            mean_a = pa[y:y + 2 * radius + 1, x:x + 2 * radius + 1].reshape(-1, 3).mean(0)
            expected[y, x] = mean_a @ guide[y, x] + pb[y:y + 2 * radius + 1, x:x + 2 * radius + 1].mean()
    assert np.abs(out - expected).max() < 1e-3
