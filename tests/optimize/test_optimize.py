"""The optimize stage on a tiny synthetic capture: it learns, it resumes exactly, it refuses bad input clearly."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.calibrate.config import CalibrateConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig
from stages.core.errors import PipelineError, StageOrderError
from pipeline.synthetic import synthesize_capture
from stages.calibrate.stage import calibrate_sequence
from stages.ingest.stage import ingest_sequence
from stages.matte.stage import matte_sequence
from stages.nersemble.checkpoint import load_checkpoint
from stages.nersemble.trainer import TrainingProgress
from stages.optimize.stage import load_trained_model, optimize_sequence
from stages.rendering.checkpoints import checkpoint_steps
from storage import CaptureStore, SequenceWorkDir

# A model small enough to learn the tiny capture in seconds, with every warm-up phase inside the run.
STEPS = 120
TINY = {
    "hash.n_levels": 6, "hash.log2_table_size": 12, "rays_per_batch": 256, "images_per_batch": 6,
    "repeat_images": 4, "step_size": 0.12, "lambda_alpha": 1.0, "occupancy.warmup_steps": 16,
    "deformation.window": [0, 7, 0, 30], "hash.window": [1, 4, 30, 60], "lr_step_size": 60,
    "eval.chunk": 2048, "target_samples_per_batch": 4096, "max_rays_per_batch": 512,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("raw"), cameras=6, frames=3, width=56, height=80, seed=1)


def _prepared(capture, root: Path) -> SequenceWorkDir:
    """ingest -> calibrate (provided) -> matte (plate): the real stages optimize depends on."""
    ingest_sequence(capture.sequence_dir, str(root), IngestConfig())
    work = SequenceWorkDir.for_sequence(str(root), capture.participant_dir.name, capture.sequence_dir.name)
    calibrate_sequence(work.uri, CalibrateConfig(mode="provided"))
    matte_sequence(work.uri, MatteConfig(method="plate", workers=1))
    return work


def _config(capture, **kwargs) -> OptimizeConfig:
    holdout = [capture.cameras[2]]
    return OptimizeConfig(steps=STEPS, overrides=TINY, holdout_cameras=holdout, device="cpu", encoding="torch",
                          seed=3, **kwargs)


@pytest.fixture(scope="module")
def trained(capture, tmp_path_factory):
    work = _prepared(capture, tmp_path_factory.mktemp("work"))
    seen: list[TrainingProgress] = []
    report = optimize_sequence(work.uri, _config(capture, checkpoint_every=50), progress=seen.append)
    return work, report, seen


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return -10 * math.log10(float(np.mean((a - b) ** 2)))


def test_training_learns_the_capture(trained, capture):
    work, report, seen = trained
    assert report["status"] == "completed" and report["steps"] == STEPS and report["stopped_by"] == "steps"
    history = [p.losses["total"] for p in seen]
    assert np.mean(history[-3:]) < 0.5 * np.mean(history[:2])
    assert seen[-1].step == STEPS and seen[-1].eta_s == pytest.approx(0, abs=1e-6) and seen[-1].rays_per_s > 0
    # The sample budget: 256 rays while every ray marches many samples, more once pruning has thinned them.
    assert seen[0].rays_per_step < seen[-1].rays_per_step <= 512
    assert STEPS * 256 < report["rays"] <= STEPS * 512

    # A training camera at the last timestep, against its frame composited on white with its matte.
    store = CaptureStore.open(work.capture_uri)
    trained_model = load_trained_model(work.uri, device="cpu")
    serial = trained_model.train_cameras[0]
    cam, t = store.camera_index(serial), store.n_frames - 1
    rgb = store.read_frame(cam, t) / 255.0
    alpha = store.read_alpha(cam, t)[..., None] / 255.0
    truth = rgb * alpha + (1 - alpha)
    render = trained_model.model.render_image(store.intrinsics[serial], store.world_2_cam[serial], store.width,
                                              store.height, t)["rgb"].numpy()
    constant = np.broadcast_to(truth.mean((0, 1)), truth.shape)
    assert _psnr(render, truth) > _psnr(constant, truth) + 3.0


def test_outputs_report_and_weights_only_checkpoint(trained, capture):
    work, report, _ = trained
    root = Path(work.uri)
    for name in ("nersemble/config.json", "nersemble/training_curves.png", "nersemble/train.log",
                 "reports/optimize.json"):
        assert (root / name).stat().st_size > 0, name
    assert checkpoint_steps(work) == [100, STEPS]  # older checkpoints are pruned; the previous one stays
    checkpoint = load_checkpoint((root / report["checkpoint"]).read_bytes())  # weights_only=True inside
    assert checkpoint["step"] == STEPS and checkpoint["holdout_cameras"] == [capture.cameras[2]]
    assert capture.cameras[2] not in report["train_cameras"] and report["use_depth"] is False
    box = np.asarray(report["scene_box_m"])
    assert report["scene_box_from"] == "mattes" and np.all(box[1] - box[0] < 0.6)
    store = CaptureStore.open(work.capture_uri)
    assert store.stage_record("optimize").report["steps"] == STEPS
    assert optimize_sequence(work.uri, _config(capture, checkpoint_every=50))["status"] == "skipped"


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_from_its_checkpoint_exactly(trained, capture, tmp_path):
    reference_work, _, _ = trained
    work = _prepared(capture, tmp_path)

    def kill_after_checkpoint(p: TrainingProgress) -> None:
        if p.step >= 60:
            raise _Killed

    with pytest.raises(_Killed):
        optimize_sequence(work.uri, _config(capture, checkpoint_every=50), progress=kill_after_checkpoint)
    assert checkpoint_steps(work) == [50]
    assert CaptureStore.open(work.capture_uri).stage_record("optimize") is None

    report = optimize_sequence(work.uri, _config(capture, checkpoint_every=50))
    assert report["resumed_from_step"] == 50 and report["steps"] == STEPS
    resumed = load_trained_model(work.uri, device="cpu").model.state_dict()
    uninterrupted = load_trained_model(reference_work.uri, device="cpu").model.state_dict()
    for name, value in uninterrupted.items():
        assert torch.allclose(resumed[name].float(), value.float(), atol=1e-5), name


def test_gpu_out_of_memory_names_the_values_to_lower_and_keeps_the_checkpoint(capture, tmp_path):
    """torch raises OutOfMemoryError from inside a training step; it is raised here from the same place (the
    progress callback runs inside the training loop), since this machine has no GPU to exhaust."""
    work = _prepared(capture, tmp_path)

    def exhaust_gpu(p: TrainingProgress) -> None:
        if p.step >= 60:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(PipelineError, match=r"out of GPU memory; lower train.rays_per_batch \(256\)") as error:
        optimize_sequence(work.uri, _config(capture, checkpoint_every=50), progress=exhaust_gpu)
    assert "hash.n_grids (4)" in str(error.value) and "--override" in str(error.value)
    assert checkpoint_steps(work) == [50]  # what was written survives
    assert CaptureStore.open(work.capture_uri).stage_record("optimize") is None


def test_bad_input_gets_clear_errors(capture, tmp_path):
    ingest_sequence(capture.sequence_dir, str(tmp_path), IngestConfig())
    work = SequenceWorkDir.for_sequence(str(tmp_path), capture.participant_dir.name, capture.sequence_dir.name)
    with pytest.raises(StageOrderError, match="nersemble-pipeline calibrate"):
        optimize_sequence(work.uri, _config(capture))
    calibrate_sequence(work.uri, CalibrateConfig(mode="provided"))
    with pytest.raises(StageOrderError, match="nersemble-pipeline matte"):
        optimize_sequence(work.uri, _config(capture))
    matte_sequence(work.uri, MatteConfig(method="plate", workers=1))
    with pytest.raises(PipelineError, match="999"):
        optimize_sequence(work.uri, _config(capture).model_copy(update={"holdout_cameras": ["999"]}))
    with pytest.raises(PipelineError, match="no_such_field"):
        optimize_sequence(work.uri, _config(capture).model_copy(update={"overrides": {"no_such_field": 1}}))
    if not torch.cuda.is_available():
        with pytest.raises(PipelineError, match="--device cuda"):
            optimize_sequence(work.uri, _config(capture).model_copy(update={"device": "cuda"}))
    with pytest.raises(StageOrderError, match="nersemble-pipeline optimize"):
        load_trained_model(work.uri, device="cpu")
    assert checkpoint_steps(work) == []  # nothing was started

    # A time budget ends training early with a usable, recorded model.
    report = optimize_sequence(work.uri, _config(capture, time_budget_s=1.0))
    assert report["stopped_by"] == "time budget" and 0 < report["steps"] < STEPS
    assert checkpoint_steps(work) == [report["steps"]]
    assert load_trained_model(work.uri, device="cpu").step == report["steps"]


def test_cli_reports_bad_input_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["optimize", str(tmp_path / "001" / "SEQ"), "--override", "rays_per_batch"])
    assert result.exit_code == 1 and "NAME=VALUE" in result.output
    result = CliRunner().invoke(app, ["optimize", str(tmp_path / "001" / "SEQ")])
    assert result.exit_code == 1 and "nersemble-pipeline ingest" in result.output
    assert "Traceback" not in result.output
