"""The stage skeleton (``stages.core.skeleton.run_stage``) on real capture stores, and the one ``Status`` vocabulary.

The first tests drive ``run_stage`` with small ``decide``/``run`` functions on a store made directly (no video),
so each step of the skeleton is seen on its own: skip, rerun on a new config or upstream record, the lock held,
report before record. The last tests prove that records written by the stage code before the skeleton existed
still skip: the config hash and input digest are computed the way each stage computed them then, written as the
stage's record, and the stage entry point must report ``skipped`` (optimize and evaluate re-run once, on purpose,
for the hold-out protocol).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stages.core.errors import CalibrationError, StageOrderError
from stages.core.skeleton import Decision, StageRun, run_stage
from stages.core.status import Status
from storage import (
    CaptureStore,
    SequenceLockedError,
    SequenceWorkDir,
    StageRecord,
    sequence_lock,
)

STAGE = "depth"  # any stage with upstream records will do: depth requires ingest, calibrate and matte


def _work_with_store(tmp_path: Path, upstream: tuple[str, ...] = ("ingest", "calibrate", "matte")) -> SequenceWorkDir:
    work = SequenceWorkDir.for_sequence(str(tmp_path / "work"), "001", "EXP-1")
    store = CaptureStore.create(work.capture_uri, cameras=["a", "b"], n_frames=2, height=8, width=8, fps=30.0,
                                frame_indices=[0, 1], intrinsics=None, world_2_cam=None)
    for c in range(2):  # what the upstream stages wrote: a record over missing chunks does not count
        for t in range(2):
            store.write_frame(c, t, np.full((8, 8, 3), 100, np.uint8))
            store.write_alpha(c, t, np.zeros((8, 8), np.uint8))
    for name in upstream:
        store.write_stage_record(StageRecord(stage=name, version="1", config_hash=f"{name}-hash"))
    return work


class Recorder:
    """``decide`` and ``run`` for ``run_stage``, remembering what ran and what it saw."""

    def __init__(self, work: SequenceWorkDir, knob: int = 1) -> None:
        self.work, self.knob = work, knob
        self.decided = self.ran = 0
        self.record_while_running: StageRecord | None = None

    def decide(self, store: CaptureStore) -> Decision[str]:
        self.decided += 1
        return Decision("the plan", {"knob": self.knob})

    def run(self, run: StageRun, plan: str) -> dict:
        self.ran += 1
        assert plan == "the plan" and run.stage == STAGE
        with pytest.raises(SequenceLockedError):  # the skeleton holds the sequence's lock while the stage runs
            with sequence_lock(self.work.uri, timeout=0):
                pass
        self.record_while_running = run.store.stage_record(STAGE)
        return run.finish({"stage": STAGE, "status": Status.COMPLETED, "knob": self.knob})

    def __call__(self) -> dict:
        return run_stage(self.work, STAGE, "1", 0, self.decide, self.run)


def test_runs_then_skips_then_reruns_on_a_new_config(tmp_path):
    work = _work_with_store(tmp_path)
    first = Recorder(work)
    assert first()["status"] == "completed" and first.ran == 1
    again = Recorder(work)
    skipped = again()
    assert again.decided == 1 and again.ran == 0
    assert skipped == {"stage": STAGE, "status": "skipped", "knob": 1}
    other = Recorder(work, knob=2)
    assert other()["status"] == "completed" and other.ran == 1
    assert other.record_while_running is None  # the stale record goes before the outputs are rewritten
    assert CaptureStore.open(work.capture_uri).stage_record(STAGE).report["knob"] == 2


def test_a_new_upstream_record_reruns_the_stage(tmp_path):
    work = _work_with_store(tmp_path)
    Recorder(work)()
    store = CaptureStore.open(work.capture_uri, mode="r+")
    store.write_stage_record(StageRecord(stage="matte", version="1", config_hash="another matte"))
    rerun = Recorder(work)
    assert rerun()["status"] == "completed" and rerun.ran == 1


def test_the_report_is_written_before_the_record(tmp_path):
    work = _work_with_store(tmp_path)

    def run(run: StageRun, plan: str) -> dict:
        return run.finish({"status": Status.COMPLETED, "cannot be JSON": object()})

    with pytest.raises(TypeError):
        run_stage(work, STAGE, "1", 0, lambda store: Decision(None, {}), run)
    assert CaptureStore.open(work.capture_uri).stage_record(STAGE) is None  # the report failed first

    Recorder(work)()
    record = CaptureStore.open(work.capture_uri).stage_record(STAGE)
    assert json.loads(Path(work.report_uri(STAGE)).read_text()) == record.report == {
        "stage": STAGE, "status": "completed", "knob": 1}


def test_missing_upstream_names_the_command_before_deciding(tmp_path):
    work = _work_with_store(tmp_path, upstream=("ingest", "calibrate"))
    recorder = Recorder(work)
    with pytest.raises(StageOrderError, match="needs the matte stage first: run `nersemble-pipeline matte"):
        recorder()
    assert recorder.decided == 0


def test_without_a_store_nothing_is_created(tmp_path):
    work = SequenceWorkDir.for_sequence(str(tmp_path / "work"), "001", "EXP-1")
    with pytest.raises(StageOrderError, match="no capture store"):
        Recorder(work)()
    assert not Path(work.uri).exists()


def test_prepare_may_refuse_and_leaves_the_old_record(tmp_path):
    work = _work_with_store(tmp_path)
    Recorder(work)()
    cleared: list[str] = []

    def refuse(store: CaptureStore, plan: str) -> str:
        raise StageOrderError("no trained model")

    with pytest.raises(StageOrderError, match="no trained model"):
        run_stage(work, STAGE, "1", 0, lambda store: Decision("plan", {"knob": 2}), Recorder(work).run,
                  prepare=refuse, clear_outputs=lambda w: cleared.append(w.uri))
    assert CaptureStore.open(work.capture_uri).stage_record(STAGE).report["knob"] == 1 and not cleared

    run_stage(work, STAGE, "1", 0, lambda store: Decision("plan", {"knob": 1}), Recorder(work).run,
              clear_outputs=lambda w: cleared.append(w.uri))
    assert not cleared  # skipped: the outputs stay


def test_a_recorded_choice_is_written_when_the_stage_skips_or_runs_and_never_when_it_refuses(tmp_path):
    work = _work_with_store(tmp_path)
    written: list[int] = []
    recorder = Recorder(work)

    def decide(knob: int):
        return lambda store: Decision("the plan", {"knob": knob}, record_choice=lambda store: written.append(knob))

    def refuse(store: CaptureStore, plan: str) -> str:
        raise StageOrderError("no trained model")

    seen_by_run: list[list[int]] = []

    def run(stage_run: StageRun, plan: str) -> dict:
        seen_by_run.append(list(written))
        return recorder.run(stage_run, plan)

    run_stage(work, STAGE, "1", 0, decide(1), run)
    assert written == [1] and seen_by_run == [[1]]  # written before the run starts
    assert run_stage(work, STAGE, "1", 0, decide(1), recorder.run)["status"] == Status.SKIPPED
    assert written == [1, 1] and recorder.ran == 1
    with pytest.raises(StageOrderError, match="no trained model"):
        run_stage(work, STAGE, "1", 0, decide(2), recorder.run, prepare=refuse)
    assert written == [1, 1]


def test_status_is_plain_json_and_reads_old_reports():
    assert json.dumps({"status": Status.COMPLETED}) == '{"status": "completed"}'
    assert f"{Status.SKIPPED}" == "skipped" and Status.FAILED == "failed"
    assert Status.of("done") is Status.COMPLETED  # optimize's reports before the enum
    assert Status.of("fallback") is Status.FALLBACK and Status.of("nonsense") is None and Status.of(None) is None


# --- records written before the skeleton still skip ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    from pipeline.synthetic import synthesize_capture
    from stages.ingest.config import IngestConfig
    from stages.ingest.stage import ingest_sequence

    capture = synthesize_capture(tmp_path_factory.mktemp("archive"), cameras=6, frames=2, width=64, height=96, seed=3)
    root = tmp_path_factory.mktemp("work")
    report = ingest_sequence(capture.sequence_dir, str(root), IngestConfig())
    assert report["status"] == "completed"
    return capture, SequenceWorkDir.for_sequence(str(root), capture.participant_dir.name, capture.sequence_dir.name)


def _old_record(store: CaptureStore, stage: str, chash: str, digest: str) -> None:
    store.write_stage_record(StageRecord(stage=stage, version="1", config_hash=chash, input_digest=digest,
                                         report={"stage": stage, "status": "completed", "written": "before"}))


def _skipped(report: dict) -> bool:
    return report["status"] == "skipped" and report["written"] == "before"


# A model small enough to train one step in a moment.
TINY = {"hash.n_levels": 4, "hash.log2_table_size": 10, "occupancy.resolution": 32, "rays_per_batch": 256}


def test_records_written_before_the_skeleton_still_skip(ingested):
    """Each stage's old formula, as its entry point computed it before ``run_stage``, against the new code.

    The hold-out protocol re-runs optimize and evaluate once, on purpose (said where they are checked)."""
    from stages.calibrate.config import CalibrateConfig
    from stages.calibrate.stage import calibrate_sequence
    from stages.core.bookkeeping import upstream_digest
    from stages.depth.config import DepthConfig
    from stages.depth.stage import depth_sequence
    from stages.evaluate.config import EvaluateConfig
    from stages.evaluate.stage import evaluate_sequence
    from stages.export.config import ExportConfig
    from stages.export.stage import export_sequence
    from stages.matte.config import MatteConfig
    from stages.matte.stage import matte_sequence
    from stages.optimize.config import OptimizeConfig
    from stages.optimize.stage import model_config, optimize_sequence
    from storage import config_hash, digest_of

    capture, work = ingested
    store = CaptureStore.open(work.capture_uri, mode="r+")

    calibrate = CalibrateConfig()  # auto -> provided: the synthetic rig ships camera_params.json
    _old_record(store, "calibrate", config_hash({**calibrate.result_fields(), "mode": "provided"}),
                upstream_digest(store, "ingest"))
    assert _skipped(calibrate_sequence(work.uri, calibrate))

    matte = MatteConfig(method="plate")  # every camera has a plate: no model, so no model in the digest
    for c in range(store.n_cameras):  # the mattes an old run wrote (a record over missing chunks is not complete)
        for t in range(store.n_frames):
            store.write_alpha(c, t, np.full((store.height, store.width), 255, np.uint8))
    _old_record(store, "matte", config_hash(matte.result_fields()),
                upstream_digest(store, "ingest", extra=digest_of(None, [])))
    assert _skipped(matte_sequence(work.uri, matte))

    depth = DepthConfig(method="sweep", device="cpu")
    for c in range(store.n_cameras):  # and the maps an old depth run wrote
        for t in range(store.n_frames):
            store.write_depth(c, t, np.full((store.height, store.width), 1.0, np.float32))
    _old_record(store, "depth", config_hash({**depth.result_fields(), "method": "sweep"}),
                upstream_digest(store, "ingest", "calibrate", "matte"))
    assert _skipped(depth_sequence(work.uri, depth))
    # 6 cameras hold none out (auto): the old maps, made from every camera, are that protocol's; the set is recorded
    store.refresh()
    assert store.holdout["cameras"] == [] and store.holdout["method"] == "auto"

    # Optimize re-runs once: its default hold-out changed meaning (the paper's cameras wherever present, 3 of these
    # 6, became the auto rule: none here), and the request left its hash for the resolved set in its digest.
    optimize = OptimizeConfig(device="cpu", encoding="torch", steps=1, threads=1, overrides=TINY)
    _old_record(store, "optimize", config_hash({**optimize.result_fields(), "model": model_config(optimize).to_dict(),
                                                "use_depth": optimize.use_depth}),
                upstream_digest(store, "ingest", "calibrate", "matte", "depth"))
    trained = optimize_sequence(work.uri, optimize)
    assert trained["status"] == "completed" and trained["holdout_cameras"] == []

    export = ExportConfig(device="cpu")
    _old_record(store, "export", config_hash({**export.result_fields(), "path_digest": None}),
                upstream_digest(store, "ingest", "calibrate", "matte", "optimize"))
    assert _skipped(export_sequence(work.uri, export))

    evaluate = EvaluateConfig(device="cpu")  # the synthetic capture's ground truth is found beside its videos
    truth = Path(capture.ground_truth_uri)
    truth_digest = digest_of(str(truth.resolve()), (truth / "zarr.json").stat().st_mtime_ns)
    _old_record(store, "evaluate", config_hash({**evaluate.result_fields(), "ground_truth": truth_digest}),
                upstream_digest(store, "ingest", "calibrate", "matte", "optimize"))
    # Evaluate re-runs once: its scores changed (band metrics, the exact images as the headline). Nothing is held
    # out, so it records that and scores nothing.
    evaluated = evaluate_sequence(work.uri, evaluate)
    assert evaluated["status"] == "completed" and evaluated["images"] == 0 and evaluated["psnr"] is None


def test_the_ingest_record_keeps_its_formula(ingested):
    from stages.core.raw_capture import discover_sequence
    from stages.ingest.config import IngestConfig
    from stages.ingest.stage import input_digest, plan_ingest
    from storage import config_hash

    capture, work = ingested
    config = IngestConfig()
    record = CaptureStore.open(work.capture_uri).stage_record("ingest")
    assert record.config_hash == config_hash(config.result_fields())
    assert record.input_digest == input_digest(plan_ingest(discover_sequence(capture.sequence_dir), config))


def test_a_calibration_error_inside_the_estimate_reaches_the_user(ingested, tmp_path):
    """CalibrationError is also a ValueError now; the estimate's catch-all for pycolmap must not swallow it."""
    import shutil

    from stages.calibrate.config import CalibrateConfig
    from stages.calibrate.stage import PROVIDED_ATTR, calibrate_sequence

    _, pristine = ingested
    target = tmp_path / "work" / pristine.participant / pristine.sequence
    shutil.copytree(pristine.uri, target)
    work = SequenceWorkDir(target)
    store = CaptureStore.open(work.capture_uri, mode="r+")
    store.set_attr(PROVIDED_ATTR, {"intrinsics": None, "world_2_cam": None})  # as if the rig shipped none
    with pytest.raises(CalibrationError, match="--focal fixed needs a provided calibration"):
        calibrate_sequence(work.uri, CalibrateConfig(mode="colmap", focal="fixed"))
    assert store.stage_record("calibrate") is None


def _drop_chunk(store: CaptureStore, array: str, camera: int, t: int) -> None:
    """Delete one chunk file, as a lost file or an older writer that skipped all-zero chunks leaves the store."""
    arr = getattr(store, array)
    (Path(store.uri) / arr.chunk_key((camera, t, 0, 0))).unlink()


def test_a_record_over_missing_chunks_reruns_and_the_report_says_why(tmp_path):
    work = _work_with_store(tmp_path)
    assert Recorder(work)()["status"] == "completed"
    store = CaptureStore.open(work.capture_uri, mode="r+")
    for c in range(2):
        for t in range(2):
            store.write_depth(c, t, np.ones((8, 8), np.float32))
    _drop_chunk(store, "depth", 0, 1)
    again = Recorder(work)
    report = again()
    assert again.ran == 1 and report["status"] == "completed"
    assert report["warnings"][0].startswith("depth ran again: its record matched, but 1 chunk(s) of its outputs were "
                                            "missing (depth: camera a, frame 1)")
    assert CaptureStore.open(work.capture_uri).stage_record(STAGE).report["warnings"] == report["warnings"]


def test_inputs_with_missing_chunks_are_refused_before_the_stage_reads_them(tmp_path):
    work = _work_with_store(tmp_path)
    _drop_chunk(CaptureStore.open(work.capture_uri), "alpha", 1, 0)
    recorder = Recorder(work)
    with pytest.raises(StageOrderError, match=r"reads the matte stage's outputs, and 1 chunk\(s\) of them are missing "
                                              r"\(alpha: camera b, frame 0\): run `nersemble-pipeline matte"):
        recorder()
    assert recorder.decided == 1 and recorder.ran == 0
    assert CaptureStore.open(work.capture_uri).stage_record(STAGE) is None
