"""The hold-out protocol on a tiny synthetic capture: hold-out cameras feed nothing that training uses.

Two copies of one capture differ only in the hold-out cameras' frames and mattes. Every training input must
come out bit-identical: the training views' depth maps (so the depth stage's hull and stereo sources), the
optimize stage's matte hull, scene box and occupancy mask, and the images the trainer reads. The set is
chosen once and recorded in the store; changing it re-runs depth, and optimize refuses depth maps made with
another set.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.synthetic import synthesize_capture
from stages.core.errors import PipelineError
from stages.depth.config import DepthConfig
from stages.depth.stage import depth_sequence
from stages.ingest.config import IngestConfig
from stages.ingest.stage import ingest_sequence
from stages.optimize.config import OptimizeConfig
from stages.optimize.stage import StoreImageSource, build_trainer, matte_hull_points, model_config, optimize_sequence
from storage import CaptureStore, SequenceWorkDir, StageRecord

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small and fast: a coarse hull and pyramid, one worker (the result does not depend on it).
DEPTH = dict(device="cpu", workers=1, hull_resolution=32, coarse_size=32, max_planes=48, preview_cameras=2)
TINY = {"hash.n_levels": 4, "hash.log2_table_size": 10, "occupancy.resolution": 32}


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    # 8 cameras: the smallest rig that gets an automatic hold-out set (2 cameras)
    return synthesize_capture(tmp_path_factory.mktemp("raw"), cameras=8, frames=2, width=40, height=56, seed=2)


def _prepared(capture, root: Path) -> SequenceWorkDir:
    """Ingest, then stand in for calibrate (the rig's calibration came with ingest) and matte (the exact alpha)."""
    ingest_sequence(capture.sequence_dir, str(root), IngestConfig())
    work = SequenceWorkDir.for_sequence(str(root), capture.participant_dir.name, capture.sequence_dir.name)
    store = CaptureStore.open(work.capture_uri, mode="r+")
    store.write_stage_record(StageRecord(stage="calibrate", version="test", config_hash="provided"))
    truth = zarr.open_group(capture.ground_truth_uri, mode="r")
    for c in range(store.n_cameras):
        for t in range(store.n_frames):
            store.write_alpha(c, t, np.asarray(truth["alpha"][c, t]))
    store.write_stage_record(StageRecord(stage="matte", version="test", config_hash="ground-truth"))
    return work


def _perturb(work: SequenceWorkDir, serials: list[str], seed: int) -> None:
    """Replace the frames and mattes of these cameras with noise."""
    store = CaptureStore.open(work.capture_uri, mode="r+")
    rng = np.random.default_rng(seed)
    for serial in serials:
        for t in range(store.n_frames):
            store.write_frame(serial, t, rng.integers(0, 256, (store.height, store.width, 3), dtype=np.uint8))
            store.write_alpha(serial, t, (rng.random((store.height, store.width)) > 0.5).astype(np.uint8) * 255)


@pytest.fixture(scope="module")
def pair(capture, tmp_path_factory):
    """The same capture twice, the second with noise for its hold-out cameras' frames and mattes; depth on both."""
    work_a = _prepared(capture, tmp_path_factory.mktemp("a"))
    root_b = tmp_path_factory.mktemp("b")
    shutil.copytree(Path(work_a.uri).parent.parent, root_b, dirs_exist_ok=True)
    work_b = SequenceWorkDir.for_sequence(str(root_b), capture.participant_dir.name, capture.sequence_dir.name)
    report_a = depth_sequence(work_a.uri, DepthConfig(**DEPTH))
    held = CaptureStore.open(work_a.capture_uri).holdout["cameras"]
    _perturb(work_b, held, seed=5)
    report_b = depth_sequence(work_b.uri, DepthConfig(**DEPTH))
    return work_a, work_b, report_a, report_b, held


def test_the_set_is_chosen_once_and_recorded(pair):
    work_a, work_b, report_a, report_b, held = pair
    store = CaptureStore.open(work_a.capture_uri)
    assert store.holdout["method"] == "auto" and len(held) == 2 and "spread" in store.holdout["reason"]
    assert CaptureStore.open(work_b.capture_uri).holdout == store.holdout  # the noise changed nothing about it
    assert report_a["holdout"]["cameras"] == held
    assert set(report_a["cameras"]) == set(store.cameras) - set(held)  # hold-outs are no reference views
    assert not any(set(c["sources"]) & set(held) for c in report_a["cameras"].values())  # nor stereo sources


def test_perturbing_hold_out_cameras_leaves_every_training_input_bit_identical(pair):
    work_a, work_b, report_a, report_b, held = pair
    a, b = CaptureStore.open(work_a.capture_uri), CaptureStore.open(work_b.capture_uri)
    train = [s for s in a.cameras if s not in held]
    assert not np.array_equal(a.read_frame(held[0], 0), b.read_frame(held[0], 0))  # the perturbation is real
    depth_a, depth_b = np.asarray(a.depth[:]), np.asarray(b.depth[:])
    for serial in train:
        index = a.camera_index(serial)
        assert np.array_equal(depth_a[index], depth_b[index]), serial
    assert (depth_a > 0).any()  # training views do have depth
    for serial in held:  # and the hold-out views have none
        assert not depth_a[a.camera_index(serial)].any() and not depth_b[b.camera_index(serial)].any()
    assert report_a["cameras"] == report_b["cameras"] and report_a["coverage"] == report_b["coverage"]

    # optimize's hull, scene box and occupancy mask, and the images its trainer reads
    cfg = model_config(OptimizeConfig(overrides=TINY))
    hull_a, hull_b = matte_hull_points(a, train), matte_hull_points(b, train)
    assert hull_a is not None and np.array_equal(hull_a, hull_b)
    trainer_a, source_a = build_trainer(a, train, cfg, torch.device("cpu"), "torch", use_depth=True)
    trainer_b, source_b = build_trainer(b, train, cfg, torch.device("cpu"), "torch", use_depth=True)
    assert source_a == source_b == "mattes"
    assert torch.equal(trainer_a.model.scene_box, trainer_b.model.scene_box)
    assert torch.equal(trainer_a.model.occupancy.visible, trainer_b.model.occupancy.visible)
    assert not bool(trainer_a.model.occupancy.visible.all())  # the hull did restrict it
    images_a, images_b = StoreImageSource(a, train, True), StoreImageSource(b, train, True)
    for view in range(len(train)):
        for t in range(a.n_frames):
            one, two = images_a.load(view, t), images_b.load(view, t)
            assert np.array_equal(one.rgb, two.rgb) and np.array_equal(one.alpha, two.alpha)
            assert np.array_equal(one.depth, two.depth)


def test_changing_the_set_reruns_depth_and_optimize_refuses_another_protocol(capture, tmp_path):
    work = _prepared(capture, tmp_path)
    first = depth_sequence(work.uri, DepthConfig(**DEPTH))
    held = first["holdout"]["cameras"]
    assert depth_sequence(work.uri, DepthConfig(**DEPTH))["status"] == "skipped"
    store = CaptureStore.open(work.capture_uri)
    other = [s for s in store.cameras if s not in held][:1]

    # optimize asked for another set than the depth maps were made with: refused before anything is written
    with pytest.raises(PipelineError, match=r"depth maps were made holding out .*re-run `nersemble-pipeline depth"):
        optimize_sequence(work.uri, OptimizeConfig(holdout=other, steps=1, overrides=TINY, device="cpu"))
    assert not Path(work.uri, "nersemble").exists() and store.stage_record("optimize") is None

    # depth with another set re-runs, re-records the set, and the old hold-outs get depth now
    again = depth_sequence(work.uri, DepthConfig(**DEPTH, holdout=other))
    assert again["status"] == "completed" and again["holdout"]["cameras"] == other
    store = CaptureStore.open(work.capture_uri)
    assert store.holdout["cameras"] == other and store.holdout["method"] == "given"
    assert not np.asarray(store.depth[store.camera_index(other[0])]).any()
    assert np.asarray(store.depth[store.camera_index(held[0])]).any()
    # the recorded set is the default from now on: no re-run, and optimize agrees with it
    assert depth_sequence(work.uri, DepthConfig(**DEPTH))["status"] == "skipped"

    # none: every camera has depth
    everything = depth_sequence(work.uri, DepthConfig(**DEPTH, holdout="none"))
    assert everything["status"] == "completed" and everything["holdout"]["method"] == "none"
    assert set(everything["cameras"]) == set(store.cameras)


def test_bad_hold_out_requests_fail_before_anything_is_written(capture, tmp_path):
    work = _prepared(capture, tmp_path)
    store = CaptureStore.open(work.capture_uri)
    before = store.attrs
    with pytest.raises(PipelineError, match="999"):
        depth_sequence(work.uri, DepthConfig(**DEPTH, holdout=["999"]))
    with pytest.raises(PipelineError, match="at least 2"):
        depth_sequence(work.uri, DepthConfig(**DEPTH, holdout=store.cameras[1:]))
    with pytest.raises(PipelineError, match="999"):
        optimize_sequence(work.uri, OptimizeConfig(holdout_cameras=["999"], device="cpu"))
    store.refresh()
    assert store.attrs == before and store.holdout is None and store.stage_record("depth") is None
    assert not store.depth.stored_chunks()  # not one depth map written
