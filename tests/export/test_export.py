"""The export stage on a tiny synthetic capture: real H.264 files with exact frame counts, sizes and codec,
camera paths (turntable geometry, keyframe files and their errors), the benchmark layout, bookkeeping.

The model is built directly (an untrained NeRSembleModel with a coarse marching step, cheap to render) and
handed to the stage in place of ``stages.optimize.stage.load_trained_model``: these tests are about what export does
with a model, not about training one (tests/test_evaluate.py runs the real trainer end to end).
"""

import json
import math
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import stages.export.stage as export_stage
import stages.rendering.model as rendering_model
from stages.core.cameras import camera_center, project
from pipeline.cli import app
from stages.calibrate.config import CalibrateConfig
from stages.export.config import ExportConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.core.errors import PipelineError, StageOrderError
from pipeline.synthetic import rig_cameras, synthesize_capture
from stages.core.video import count_frames, probe_video
from stages.calibrate.stage import calibrate_sequence
from stages.export.stage import export_sequence
from stages.rendering.paths import (OFFICIAL_CONE_DEG, CameraPath, CameraPathError, CameraView, expand_path,
                                 read_camera_path, rig_frame, timestep_for, turntable_path, write_camera_path)
from stages.ingest.stage import ingest_sequence
from stages.matte.stage import matte_sequence
from stages.nersemble import NeRSembleModel, preset, scene_box_from_cameras
from storage import CaptureStore, SequenceWorkDir, StageRecord

SIZE = (48, 64)
FRAMES = 2

REAL_LOAD_MODEL = rendering_model.load_model  # the module fixture below stands a model in for it


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("raw"), cameras=4, frames=FRAMES, width=SIZE[0],
                              height=SIZE[1], seed=2)


def _prepare(capture, root: Path, *, optimized: bool = True) -> SequenceWorkDir:
    """The real ingest, calibrate (provided) and matte (plate) stages; optionally a stand-in optimize record."""
    ingest_sequence(capture.sequence_dir, str(root), IngestConfig())
    work = SequenceWorkDir.for_sequence(str(root), capture.participant_dir.name, capture.sequence_dir.name)
    calibrate_sequence(work.uri, CalibrateConfig(mode="provided"))
    matte_sequence(work.uri, MatteConfig(method="plate", workers=1))
    if optimized:
        CaptureStore.open(work.capture_uri, mode="r+").write_stage_record(
            StageRecord(stage="optimize", version="test", config_hash="stand-in"))
    return work


def _trained(store: CaptureStore, holdout: list[str]) -> SimpleNamespace:
    """What ``load_trained_model`` returns, around an untrained model that renders in milliseconds per frame."""
    cfg = preset("preview").with_overrides({"step_size": 0.3, "eval.chunk": 1024})
    box = scene_box_from_cameras([store.world_2_cam[s] for s in store.cameras], (0.3, 0.3, 0.3),
                                 cfg.scene.world_scale)
    torch.manual_seed(0)
    model = NeRSembleModel(cfg, store.n_frames, box, backend="torch").eval()
    train = [s for s in store.cameras if s not in holdout]
    return SimpleNamespace(model=model, config=cfg, step=0, train_cameras=train, holdout_cameras=holdout,
                           n_timesteps=store.n_frames, warnings=[])


@pytest.fixture(scope="module")
def prepared(capture, tmp_path_factory):
    work = _prepare(capture, tmp_path_factory.mktemp("work"))
    store = CaptureStore.open(work.capture_uri)
    trained = _trained(store, [capture.cameras[1]])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rendering_model, "load_model", lambda work_dir, device, stage, eval_substeps=None: trained)
        yield work, trained


@pytest.fixture
def fresh(prepared, tmp_path):
    """A copy of the prepared sequence folder, for tests that change its outputs."""
    work, trained = prepared
    root = tmp_path / "copy"
    target = root / work.participant / work.sequence
    shutil.copytree(work.uri, target)
    return SequenceWorkDir(str(target)), trained


def _keyframe_path(capture, frames: int | None = 4) -> CameraPath:
    params = rig_cameras(SIZE[0], SIZE[1], capture.cameras)
    views = [CameraView(K=params.intrinsics[s], world_2_cam=params.world_2_cam[s], width=SIZE[0] // 2,
                        height=SIZE[1] // 2, time=t) for s, t in ((capture.cameras[0], 0.0),
                                                                   (capture.cameras[3], 1.0))]
    views = [CameraView(K=np.diag([0.5, 0.5, 1.0]) @ v.K, world_2_cam=v.world_2_cam, width=v.width,
                        height=v.height, time=v.time) for v in views]
    return CameraPath(keyframes=views, width=SIZE[0] // 2, height=SIZE[1] // 2, frames=frames)


def _check_video(path: Path, frames: int, size: tuple[int, int]) -> None:
    info = probe_video(path)
    assert info.codec == "h264"
    assert (info.width, info.height) == size
    assert count_frames(path) == frames


@pytest.fixture(scope="module")
def exported(prepared, capture, tmp_path_factory):
    """One export with every kind of output, at half the stored size."""
    work, trained = prepared
    path_file = write_camera_path(tmp_path_factory.mktemp("paths") / "path.json", _keyframe_path(capture))
    config = ExportConfig(seconds=0.5, fps=12.0, resolution_scale=0.5, depth_videos=True, background="transparent",
                          path=str(path_file), path_cameras=[capture.cameras[0], capture.cameras[3]], benchmark=True,
                          benchmark_size=(40, 56), chunk=1024, device="cpu")
    seen: list[tuple[int, int]] = []
    report = export_sequence(work.uri, config, progress=lambda done, total: seen.append((done, total)))
    return work, trained, config, report, seen


def test_turntable_and_every_video_have_exact_frames_size_and_h264(exported, capture):
    work, trained, config, report, seen = exported
    export = Path(work.uri) / "export"
    half = (SIZE[0] // 2, SIZE[1] // 2)
    expected = {"turntable": 6, f"holdout/cam_{capture.cameras[1]}": FRAMES, "path": 4, "rig_path": 6}
    assert report["status"] == "completed"
    for name, frames in expected.items():
        for suffix in ("", "_depth", "_alpha"):
            _check_video(export / f"{name}{suffix}.mp4", frames, half)
        pngs = sorted((export / f"{name}_rgba").glob("*.png"))
        assert len(pngs) == frames
        rgba = cv2.imread(str(pngs[0]), cv2.IMREAD_UNCHANGED)
        assert rgba.shape == (half[1], half[0], 4)
        assert report["videos"][name]["frames"] == frames
    assert probe_video(export / "turntable.mp4").fps == pytest.approx(12.0)
    total = sum(expected.values()) + FRAMES  # + the benchmark video
    assert report["frames"] == total and seen[-1] == (total, total)
    assert [done for done, _ in seen] == list(range(total + 1))
    assert json.loads((Path(work.uri) / "reports" / "export.json").read_text())["frames"] == total
    assert not list(export.rglob(".*partial*")), "temporary files must not survive"


def test_benchmark_submission_has_the_nvs_layout(exported, capture):
    work, trained, config, report, seen = exported
    holdout = capture.cameras[1]
    entry = f"001/{capture.sequence_dir.name}/cam_{holdout}.mp4"
    video = Path(work.uri) / "export" / "benchmark" / entry
    _check_video(video, FRAMES, (40, 56))
    assert probe_video(video).fps == pytest.approx(73.0)
    with zipfile.ZipFile(Path(work.uri) / report["benchmark_submission"]) as archive:
        assert archive.namelist() == [entry]
        assert archive.read(entry) == video.read_bytes()
    assert any("NVS task" in warning for warning in report["warnings"])  # our hold-out is not the benchmark's


def test_rerun_with_the_same_config_is_skipped(exported):
    work, trained, config, report, seen = exported
    video = Path(work.uri) / "export" / "turntable.mp4"
    before = video.stat().st_mtime_ns
    again = export_sequence(work.uri, config)
    assert again["status"] == "skipped" and again["frames"] == report["frames"]
    assert video.stat().st_mtime_ns == before


def test_a_changed_camera_path_file_renders_again(fresh, capture, tmp_path):
    work, trained = fresh
    path_file = write_camera_path(tmp_path / "path.json", _keyframe_path(capture, frames=3))
    config = ExportConfig(turntable=False, holdout=False, path=str(path_file), device="cpu", chunk=1024)
    assert export_sequence(work.uri, config)["status"] == "completed"
    assert export_sequence(work.uri, config)["status"] == "skipped"
    write_camera_path(path_file, _keyframe_path(capture, frames=2))
    assert export_sequence(work.uri, config)["status"] == "completed"
    _check_video(Path(work.uri) / "export" / "path.mp4", 2, (SIZE[0] // 2, SIZE[1] // 2))


# --- camera paths --------------------------------------------------------------------------------------------


def test_turntable_circles_the_rig_focus_while_time_plays():
    params = rig_cameras(SIZE[0], SIZE[1])
    poses = list(params.world_2_cam.values())
    centre = np.array([0.0, -0.04, 0.0])
    rig = rig_frame(poses, centre)
    assert rig.up == pytest.approx([0, 1, 0], abs=0.05)  # the synthetic rig's world is y up, faces +z
    assert rig.front == pytest.approx([0, 0, 1], abs=0.05)
    assert rig.distance == pytest.approx(np.mean(np.linalg.norm(camera_center(np.array(poses)) - centre, axis=1)))
    K = np.array([[100.0, 0, 24], [0, 100.0, 32], [0, 0, 1]])
    views = turntable_path(rig, K, 48, 64, 96, radius=0.9)
    assert len(views) == 96 and views[0].time == 0.0 and views[-1].time == 1.0
    eyes = np.array([camera_center(v.world_2_cam) for v in views])
    assert np.linalg.norm(eyes - centre, axis=1) == pytest.approx(np.full(96, 0.9))
    for view in views[::7]:
        uv, z = project(centre, view.K, view.world_2_cam)
        assert uv == pytest.approx([24, 32], abs=1e-6) and z > 0  # the focus is in the middle of every frame
    assert (eyes[0] - centre) @ rig.front > 0.85  # starts in front, goes all the way round
    assert (eyes[48] - centre) @ rig.front < -0.85
    # time: every timestep of a 24-frame sequence, in order, upstream's round(t (T - 1))
    steps = [v.timestep(24) for v in views]
    assert steps == sorted(steps) and set(steps) == set(range(24)) and timestep_for(0.5, 3) == 1

    swaying = turntable_path(rig, K, 48, 64, 40, arc_deg=90, elevation_deg=10)
    directions = np.array([camera_center(v.world_2_cam) - centre for v in swaying])
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    azimuths = np.degrees(np.arctan2(directions @ rig.side, directions @ rig.front))
    assert azimuths.max() == pytest.approx(45, abs=0.5) and azimuths.min() == pytest.approx(-45, abs=0.5)
    assert np.degrees(np.arcsin(directions @ rig.up)) == pytest.approx(np.full(40, rig.elevation_deg + 10))

    official = turntable_path(rig, K, 48, 64, 12, trajectory="official")
    tilt = math.radians(rig.elevation_deg)  # the circle is around the rig's mean viewing axis
    axis = math.cos(tilt) * rig.front + math.sin(tilt) * rig.up
    off_axis = [math.degrees(math.acos(np.clip((camera_center(v.world_2_cam) - centre) @ axis / rig.distance,
                                               -1, 1))) for v in official]
    assert off_axis == pytest.approx([OFFICIAL_CONE_DEG] * 12, abs=0.5)
    assert (camera_center(official[0].world_2_cam) - centre) @ rig.up < 0  # upstream starts below the face


def test_camera_path_json_round_trips_and_interpolates_through_keyframes(capture, tmp_path):
    path = _keyframe_path(capture)
    path = CameraPath(keyframes=path.keyframes + [path.keyframes[0]], width=path.width, height=path.height,
                      keyframe_frames=[0, 5, 9], fps=30.0)
    file = write_camera_path(tmp_path / "path.json", path)
    back = read_camera_path(file)
    assert (back.width, back.height, back.fps, back.keyframe_frames) == (path.width, path.height, 30.0, [0, 5, 9])
    for a, b in zip(path.keyframes, back.keyframes):
        assert np.array_equal(a.K, b.K) and np.array_equal(a.world_2_cam, b.world_2_cam) and a.time == b.time
    assert json.loads(file.read_text()) == json.loads(write_camera_path(tmp_path / "again.json", back).read_text())

    views = expand_path(back, default_frames=99)
    assert len(views) == 10  # the last pinned frame decides
    for frame, keyframe in zip((0, 5, 9), back.keyframes):
        assert views[frame].world_2_cam == pytest.approx(keyframe.world_2_cam, abs=1e-9)
        assert views[frame].time == keyframe.time
    for view in views:
        rotation = view.world_2_cam[:3, :3]
        assert rotation @ rotation.T == pytest.approx(np.eye(3), abs=1e-9)
    assert [v.time for v in views[:6]] == pytest.approx(np.linspace(0, 1, 6))
    # without pinned frames: keyframes spread evenly over the requested count
    plain = CameraPath(keyframes=path.keyframes[:2], width=path.width, height=path.height)
    spread = expand_path(plain, default_frames=7)
    assert len(spread) == 7 and spread[-1].world_2_cam == pytest.approx(path.keyframes[1].world_2_cam, abs=1e-9)


def _valid_json(capture) -> dict:
    from stages.rendering.paths import camera_path_json

    return camera_path_json(_keyframe_path(capture))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["keyframes"][1].pop("K"), r"keyframe 1: missing field 'K'"),
    (lambda d: d["keyframes"][0].update(world_2_cam=np.diag([2.0, 1, 1, 1]).tolist()),
     r"keyframe 0: field 'world_2_cam' is not a rigid transform"),
    (lambda d: d["keyframes"][1].update(world_2_cam=[[1, 0, 0]]), r"keyframe 1: field 'world_2_cam' must be a finite 4x4"),
    (lambda d: d["keyframes"][1].update(time=1.5), r"keyframe 1: field 'time' must be a number in \[0, 1\]"),
    (lambda d: d["keyframes"][0].update(K="fx"), r"keyframe 0: field 'K' is not a numeric 3x3"),
    (lambda d: d.pop("width"), r"'width' and 'height'"),
    (lambda d: d.update(keyframes=[]), r"'keyframes' must be a non-empty list"),
    (lambda d: [k.update(frame=f) for k, f in zip(d["keyframes"], (0, 0))],
     r"keyframe 1: field 'frame' \(0\) must be larger"),
])
def test_malformed_camera_path_names_file_keyframe_and_field(capture, tmp_path, mutate, message):
    data = _valid_json(capture)
    mutate(data)
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(data))
    with pytest.raises(CameraPathError, match=message) as error:
        read_camera_path(file)
    assert str(file) in str(error.value)


def test_unreadable_camera_path_files(tmp_path):
    with pytest.raises(CameraPathError, match="not found"):
        read_camera_path(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{\"width\": 3,")
    with pytest.raises(CameraPathError, match=r"broken\.json: not valid JSON"):
        read_camera_path(tmp_path / "broken.json")


# --- bad input at the stage and the CLI -------------------------------------------------------------------------


def test_malformed_path_fails_before_anything_is_rendered(fresh, capture, tmp_path):
    work, trained = fresh
    data = _valid_json(capture)
    data["keyframes"][1]["time"] = "late"
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(data))
    before = sorted(p.name for p in (Path(work.uri) / "export").iterdir())
    with pytest.raises(CameraPathError, match=r"bad\.json: keyframe 1: field 'time'"):
        export_sequence(work.uri, ExportConfig(path=str(file), device="cpu"))
    assert sorted(p.name for p in (Path(work.uri) / "export").iterdir()) == before
    result = CliRunner().invoke(app, ["export", work.uri, "--path", str(file)])
    assert result.exit_code == 1
    assert "bad.json: keyframe 1: field 'time'" in result.output and "Traceback" not in result.output


def test_export_needs_a_trained_model(capture, tmp_path):
    work = _prepare(capture, tmp_path / "untrained", optimized=False)
    with pytest.raises(StageOrderError, match="nersemble-pipeline optimize"):
        export_sequence(work.uri, ExportConfig(device="cpu"))
    # a record but no checkpoint: the trainer's loader says the same
    pytest.importorskip("stages.optimize.stage")
    CaptureStore.open(work.capture_uri, mode="r+").write_stage_record(
        StageRecord(stage="optimize", version="test", config_hash="stand-in"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rendering_model, "load_model", REAL_LOAD_MODEL)
        with pytest.raises(StageOrderError, match="nersemble-pipeline optimize"):
            export_sequence(work.uri, ExportConfig(device="cpu"))


def test_bad_options_are_clear(fresh, capture):
    work, trained = fresh
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="--device cuda: torch sees no CUDA device"):
            export_sequence(work.uri, ExportConfig(device="cuda"))
    with pytest.raises(PipelineError, match="--through-cameras: 999 not in this capture"):
        export_sequence(work.uri, ExportConfig(path_cameras=["999"], device="cpu"))
    result = CliRunner().invoke(app, ["export", work.uri, "--background", "green"])
    assert result.exit_code == 1 and "--background" in result.output


def test_cli_renders_what_was_asked_for(fresh, capture):
    work, trained = fresh
    result = CliRunner().invoke(app, ["export", work.uri, "--turntable", "--seconds", "0.25", "--fps", "8",
                                      "--resolution-scale", "0.5", "--device", "cpu", "--chunk", "1024",
                                      "--trajectory", "official"])
    assert result.exit_code == 0, result.output
    assert "export completed: 2 frames" in result.output and "export/turntable.mp4" in result.output
    _check_video(Path(work.uri) / "export" / "turntable.mp4", 2, (SIZE[0] // 2, SIZE[1] // 2))
    report = json.loads((Path(work.uri) / "reports" / "export.json").read_text())
    assert list(report["videos"]) == ["turntable"] and report["config"]["trajectory"] == "official"
