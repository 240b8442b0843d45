"""Interrupts and damaged checkpoints: SIGINT/SIGTERM checkpoint and resume; a corrupt checkpoint is named."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.synthetic import synthesize_capture
from stages.calibrate.config import CalibrateConfig
from stages.calibrate.stage import calibrate_sequence
from stages.core.errors import PipelineError
from stages.ingest.config import IngestConfig
from stages.ingest.stage import ingest_sequence
from stages.matte.config import MatteConfig
from stages.matte.stage import matte_sequence
from stages.nersemble.checkpoint import CheckpointError, load_checkpoint
from stages.nersemble.trainer import TrainingProgress
from stages.optimize.config import OptimizeConfig
from stages.optimize.stage import load_trained_model, optimize_sequence
from stages.rendering.checkpoints import checkpoint_path, checkpoint_steps
from storage import CaptureStore, SequenceWorkDir

REPO = Path(__file__).resolve().parents[2]
TINY = {"hash.n_levels": 4, "hash.log2_table_size": 10, "rays_per_batch": 128, "images_per_batch": 4,
        "repeat_images": 4, "step_size": 0.2, "occupancy.warmup_steps": 8, "eval.chunk": 2048,
        "eval_every_batch": 5}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A calibrated, matted tiny sequence, copied per test (training writes into it)."""
    capture = synthesize_capture(tmp_path_factory.mktemp("raw"), cameras=4, frames=2, width=32, height=48, seed=2)
    root = tmp_path_factory.mktemp("work")
    ingest_sequence(capture.sequence_dir, str(root), IngestConfig())
    work = SequenceWorkDir.for_sequence(str(root), capture.participant_dir.name, capture.sequence_dir.name)
    calibrate_sequence(work.uri, CalibrateConfig(mode="provided"))
    matte_sequence(work.uri, MatteConfig(method="plate", workers=1))
    return capture, work


@pytest.fixture()
def work(prepared, tmp_path):
    import shutil

    _, source = prepared
    target = tmp_path / "work" / source.participant / source.sequence
    shutil.copytree(source.uri, target)
    return SequenceWorkDir(str(target))


def _config(capture, **kwargs) -> OptimizeConfig:
    return OptimizeConfig(overrides=TINY, holdout_cameras=[capture.cameras[0]], device="cpu", encoding="torch",
                          **{"steps": 40, **kwargs})


class _Killed(Exception):
    pass


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_named_skipped_on_resume_and_refused_by_export(prepared, work):
    capture, _ = prepared

    def kill(p: TrainingProgress) -> None:
        if p.step >= 25:
            raise _Killed

    with pytest.raises(_Killed):
        optimize_sequence(work.uri, _config(capture, checkpoint_every=10), progress=kill)
    assert checkpoint_steps(work) == [10, 20]  # the newest two are kept
    newest = Path(work.path(checkpoint_path(20)))
    _flip(newest, len(newest.read_bytes()) // 2)  # tensor data

    with pytest.raises(PipelineError, match=rf"{newest}: corrupt checkpoint") as error:
        load_trained_model(work.uri, device="cpu")
    assert len(str(error.value).splitlines()) == 1 and "weights_only" not in str(error.value)

    report = optimize_sequence(work.uri, _config(capture, checkpoint_every=10))
    assert report["resumed_from_step"] == 10 and report["steps"] == 40 and report["resumed"] == "resumed from step 10"
    assert any(str(newest) in w and "corrupt checkpoint" in w for w in report["warnings"])


def test_flipped_header_bytes_give_one_line_naming_the_file(prepared, work):
    from typer.testing import CliRunner

    from pipeline.cli import app

    capture, _ = prepared
    optimize_sequence(work.uri, _config(capture, steps=5))
    path = Path(work.path(checkpoint_path(5)))
    _flip(path, 3)  # inside torch's zip header
    with pytest.raises(CheckpointError, match=f"{path}: corrupt checkpoint"):
        load_checkpoint(path.read_bytes(), name=str(path))
    result = CliRunner().invoke(app, ["export", work.uri, "--turntable"])
    assert result.exit_code == 1 and str(path) in result.output and "corrupt checkpoint" in result.output
    assert "Traceback" not in result.output and "weights_only" not in result.output
    path.write_bytes(path.read_bytes()[:-40])  # cut short
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(path.read_bytes(), name=str(path))


def _cli_optimize(work: SequenceWorkDir, capture, steps: int) -> list[str]:
    overrides = [arg for key, value in TINY.items() for arg in ("--override", f"{key}={json.dumps(value)}")]
    return [sys.executable, "-c", "from pipeline.cli import app; app()", "optimize", work.uri, "--steps", str(steps),
            "--device", "cpu", "--encoding", "torch", "--holdout", capture.cameras[0], "--threads", "1", *overrides]


def _wait_for_training(work: SequenceWorkDir, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    log = Path(work.path("nersemble/train.log"))
    deadline = time.monotonic() + timeout
    while not (log.exists() and "step " in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.1)


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_reports_and_the_next_run_resumes(prepared, work, signum, exit_code):
    capture, _ = prepared
    proc = subprocess.Popen(_cli_optimize(work, capture, 100_000), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _wait_for_training(work, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == exit_code, err
    assert "interrupted by " + signal.Signals(signum).name in err and "run the same command again to resume" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    report = json.loads(Path(work.path("reports/optimize.json")).read_text())
    assert report["stopped_by"] == "interrupted" and report["status"] == "interrupted"
    stopped_at = report["steps"]
    assert checkpoint_steps(work)[-1] == stopped_at > 0
    assert CaptureStore.open(work.capture_uri).stage_record("optimize") is None  # not complete
    lines_before = Path(work.path("nersemble/train.log")).read_text().splitlines()
    assert lines_before and lines_before[-1].startswith(f"step {stopped_at}/")

    # The same settings again (fewer steps would be another config): it resumes, and says so.
    resumed = optimize_sequence(work.uri, _config(capture, steps=100_000, threads=1, time_budget_s=0.5))
    assert resumed["resumed_from_step"] == stopped_at and resumed["resumed"] == f"resumed from step {stopped_at}"
    log = Path(work.path("nersemble/train.log")).read_text().splitlines()
    assert log[:len(lines_before)] == lines_before and f"resumed from step {stopped_at}" in log


def test_wall_time_checkpoints(prepared, work):
    capture, _ = prepared
    seen: list[list[int]] = []

    def look(p: TrainingProgress) -> None:
        seen.append(checkpoint_steps(work))
        if p.step >= 30:
            raise _Killed

    with pytest.raises(_Killed):
        optimize_sequence(work.uri, _config(capture, checkpoint_every_s=1e-6), progress=look)
    assert seen[-1] and seen[-1][-1] >= 25  # a checkpoint after (nearly) every step, not every 1000


WORKER_THREAD_TRAINING = textwrap.dedent("""
    import signal, sys
    from concurrent.futures import ThreadPoolExecutor
    from stages.core.interrupts import forward_stop_signals
    from stages.optimize.config import OptimizeConfig
    from stages.optimize.stage import optimize_sequence

    def bridge(signum, frame):  # what Prefect's flow engine does in the main thread
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, bridge)
    config = OptimizeConfig.model_validate_json(sys.argv[2])
    with forward_stop_signals(), ThreadPoolExecutor(1) as pool:  # as flows/archive.py runs sequences
        pool.submit(optimize_sequence, sys.argv[1], config).result()
""")


def test_training_in_a_worker_thread_checkpoints_on_a_forwarded_signal(prepared, work):
    """Prefect may run the task in a worker thread, where no signal handler can be installed: the main thread
    forwards the signal to it, then runs its own handler (here a stand-in for Prefect's)."""
    capture, _ = prepared
    config = _config(capture, steps=100_000, threads=1)
    proc = subprocess.Popen([sys.executable, "-c", WORKER_THREAD_TRAINING, work.uri, config.model_dump_json()],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _wait_for_training(work, proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM  # the main thread's own handler still ran
    report = json.loads(Path(work.path("reports/optimize.json")).read_text())
    assert report["stopped_by"] == "interrupted" and checkpoint_steps(work)[-1] == report["steps"]


PREFECT_FLOW = textwrap.dedent("""
    import faulthandler, signal, sys
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a stack dump if the test finds it stuck
    from flows.optimize import optimize_sequence
    from stages.optimize.config import OptimizeConfig

    optimize_sequence(sys.argv[1], OptimizeConfig.model_validate_json(sys.argv[2]))
""")


def test_sigterm_to_a_prefect_flow_run_checkpoints_and_the_next_run_resumes(prepared, work, tmp_path):
    """Prefect cancels a run by sending its process SIGTERM; the flow runs in-process here, on a private API.

    The run gets a process group of its own, so the temporary API server it starts goes with it at the end.
    """
    capture, _ = prepared
    config = _config(capture, steps=100_000, threads=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    log = tmp_path / "flow.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", PREFECT_FLOW, work.uri, config.model_dump_json()], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_training(work, proc, timeout=240)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            pytest.fail(f"the flow run did not end after SIGTERM:\n{log.read_text()[-6000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the temporary API server, if it outlived the run
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    assert proc.returncode != 0, log.read_text()[-3000:]
    report = json.loads(Path(work.path("reports/optimize.json")).read_text())
    assert report["stopped_by"] == "interrupted" and checkpoint_steps(work)[-1] == report["steps"]
    resumed = optimize_sequence(work.uri, config.model_copy(update={"time_budget_s": 0.5}))
    assert resumed["resumed_from_step"] == report["steps"]


def _as_before_checksums(path: Path) -> None:
    """Rewrite a checkpoint the way the trainer wrote it before content hashes: torch's file alone."""
    import torch

    checkpoint = load_checkpoint(path.read_bytes())  # verified, and without the key that says it had a hash
    with open(path, "wb") as f:
        torch.save(checkpoint, f)


def test_a_checkpoint_from_before_checksums_loads_with_a_warning_and_a_cut_one_is_skipped(prepared, work):
    """Old models keep working (resume, export, evaluate), each saying the file was not verified; a damaged file
    (a hash that does not match, or cut short) is still refused, and a resume falls back past it."""
    from stages.evaluate.config import EvaluateConfig
    from stages.evaluate.stage import evaluate_sequence
    from stages.export.config import ExportConfig
    from stages.export.stage import export_sequence

    capture, _ = prepared

    def kill(p: TrainingProgress) -> None:
        if p.step >= 25:
            raise _Killed

    with pytest.raises(_Killed):
        optimize_sequence(work.uri, _config(capture, checkpoint_every=10), progress=kill)
    older, newest = (Path(work.path(checkpoint_path(step))) for step in (10, 20))
    _as_before_checksums(older)
    assert older.read_bytes()[-48:-32] != b"NERSEMBLE-SHA256"
    newest.write_bytes(newest.read_bytes()[: len(newest.read_bytes()) // 2])  # cut short mid-file

    report = optimize_sequence(work.uri, _config(capture, checkpoint_every=10))
    assert report["status"] == "completed" and report["resumed_from_step"] == 10 and report["steps"] == 40
    assert any(str(newest) in w and "not a complete checkpoint" in w and "skipped" in w for w in report["warnings"])
    assert f"{older}: written before checksums; not verified (loaded as it is)" in report["warnings"]

    final = Path(work.path(report["checkpoint"]))
    _as_before_checksums(final)
    trained = load_trained_model(work.uri, device="cpu")
    assert trained.step == 40 and trained.warnings == [f"{final}: written before checksums; not verified (loaded as it is)"]
    exported = export_sequence(work.uri, ExportConfig(holdout=False, seconds=0.25, fps=4, device="cpu"))
    assert exported["status"] == "completed" and trained.warnings[0] in exported["warnings"]
    evaluated = evaluate_sequence(work.uri, EvaluateConfig(timesteps=1, lpips=False, device="cpu"))
    assert evaluated["status"] == "completed" and trained.warnings[0] in evaluated["warnings"]

    # A file that was written with a hash and lost it, or whose hash does not match, is an error, never a warning.
    data = final.read_bytes()
    stripped = Path(work.path(checkpoint_path(30)))
    assert stripped.exists() and stripped.read_bytes()[-48:-32] == b"NERSEMBLE-SHA256"
    with pytest.raises(CheckpointError, match="written with a content hash that is gone: cut short"):
        load_checkpoint(stripped.read_bytes()[:-48], name=str(stripped))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(data[:-100], name=str(final))  # an old checkpoint cut short
    flipped = bytearray(stripped.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        load_checkpoint(bytes(flipped), name=str(stripped))
