"""The sequence flow under Prefect's real test harness: every stage runs, artifacts appear, re-runs skip,
a killed run resumes, bad input fails clearly without retries."""

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.sequence import STAGES, depth_config, process_sequence
from stages.config import PipelineConfig
from stages.depth.config import DepthConfig
from stages.evaluate.config import EvaluateConfig
from stages.export.config import ExportConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig
from pipeline.synthetic import synthesize_capture
from storage import CaptureStore, CaptureStoreError, SequenceWorkDir

REPO = Path(__file__).resolve().parents[2]
# A model small enough to train a handful of steps in seconds on one CPU thread (as in test_optimize.py).
TINY = {
    "hash.n_levels": 6, "hash.log2_table_size": 12, "rays_per_batch": 256, "target_samples_per_batch": 0,
    "images_per_batch": 2, "repeat_images": 4, "step_size": 0.12, "occupancy.warmup_steps": 4, "eval.chunk": 2048,
}
KEY = "001-exp-1-head"


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("archive"), cameras=3, frames=3, width=48, height=64)


def _config(capture) -> PipelineConfig:
    """Every stage at its smallest: 2 frames, plate matting, 6 training steps, a 2-frame turntable, 1 timestep."""
    return PipelineConfig(
        ingest=IngestConfig(count=2),
        matte=MatteConfig(method="plate", workers=1),
        optimize=OptimizeConfig(steps=6, overrides=TINY, holdout_cameras=[capture.cameras[2]], device="cpu",
                                encoding="torch", seed=3, threads=1),
        export=ExportConfig(seconds=0.5, fps=4, holdout=False, threads=1),
        evaluate=EvaluateConfig(timesteps=1, lpips=False, threads=1),
    )


async def _task_run_names() -> set[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return {run.name for run in await client.read_task_runs()}


async def _log_messages() -> list[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return [log.message for log in await client.read_logs()]


async def _artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return {artifact.key for artifact in await client.read_artifacts() if artifact.key}


def _records(work: SequenceWorkDir) -> dict[str, str]:
    """Stage records so far; none while ingest is still creating the store (its group exists before its arrays)."""
    try:
        store = CaptureStore.open(work.capture_uri)
    except (FileNotFoundError, CaptureStoreError):
        return {}
    return {name: record.finished_at for name, record in store.stage_records().items()}


@pytest.mark.slow
def test_sequence_flow_runs_every_stage_publishes_and_skips_on_rerun(prefect_harness, capture, tmp_path):
    reports = process_sequence(str(capture.sequence_dir), str(tmp_path), _config(capture))
    assert list(reports) == list(STAGES)
    assert {stage: report["status"] for stage, report in reports.items()} == {stage: "completed" for stage in STAGES}
    assert reports["optimize"]["steps"] == 6
    assert reports["calibrate"]["resolved_mode"] == "provided"
    # one hold-out set: depth kept out the camera optimize held out, and the store recorded it
    assert reports["depth"]["holdout"]["cameras"] == reports["optimize"]["holdout_cameras"] == [capture.cameras[2]]
    work = SequenceWorkDir.for_sequence(str(tmp_path), "001", "EXP-1-head")
    assert work.exists("export", "turntable.mp4") and work.exists("export", "metrics.json")

    keys = asyncio.run(_artifact_keys())
    expected = {f"{stage}-{KEY}" for stage in STAGES}
    expected |= {f"{stage}-cameras-{KEY}" for stage in ("calibrate", "matte", "depth", "evaluate")}
    expected |= {f"{what}-{KEY}" for what in ("training-progress", "training-status", "turntable", "metrics",
                                             "matte-preview", "depth-preview", "training-curves", "sequence")}
    assert expected <= keys, sorted(expected - keys)
    names = asyncio.run(_task_run_names())
    assert {f"{stage} 001/EXP-1-head" for stage in STAGES} <= names
    # the task run Prefect makes for the optimize subflow is named after the sequence, not optimize-sequence-0
    assert "optimize-sequence 001/EXP-1-head" in names and not any(n.startswith("optimize-sequence-") for n in names)
    # each stage's line once: the optimize subflow logs its own, the sequence run does not repeat it
    lines = [m for m in asyncio.run(_log_messages()) if m.startswith(("optimize completed", "optimize done"))]
    assert len(lines) == 1, lines

    summary = work.read_report("sequence")
    assert summary["status"] == "completed" and summary["psnr"] == pytest.approx(reports["evaluate"]["psnr"], abs=1e-3)
    records = _records(work)
    again = process_sequence(str(capture.sequence_dir), str(tmp_path), _config(capture))
    assert {stage: report["status"] for stage, report in again.items()} == {stage: "skipped" for stage in STAGES}
    assert _records(work) == records


def _api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


_KILLED_RUN = """
import sys
from stages.config import PipelineConfig
from flows.sequence import process_sequence
config = PipelineConfig.model_validate({"ingest": {"count": 2}, "matte": {"method": "plate", "workers": 1},
                                        "optimize": {"steps": 400, "device": "cpu", "encoding": "torch", "threads": 1}})
process_sequence(sys.argv[1], sys.argv[2], config, stages=sys.argv[3:])
"""


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_where_it_stopped(prefect_harness, capture, tmp_path):
    """Kill -9 a flow run (its own process) once depth has finished, then run again: done stages skip."""
    work = SequenceWorkDir.for_sequence(str(tmp_path), "001", "EXP-1-head")
    # The killed run trains under its own GPU limit: its slot lease outlives the process by up to a minute.
    env = {**os.environ, "PREFECT_API_URL": _api_url(), "NERSEMBLE_GPU_LIMIT": "gpu-killed-run"}
    process = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(capture.sequence_dir), str(tmp_path),
                                "ingest", "calibrate", "matte", "depth", "optimize"],
                               cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "depth" not in _records(work) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, "the flow run ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = _records(work)
    assert {"ingest", "calibrate", "matte", "depth"} <= set(before) and "optimize" not in before

    config = _config(capture)  # with the killed run's hold-out set (another one would rightly re-run depth)
    config = config.model_copy(update={"optimize": config.optimize.model_copy(update={"holdout_cameras": None})})
    resumed = process_sequence(str(capture.sequence_dir), str(tmp_path), config,
                               stages=["ingest", "calibrate", "matte", "depth", "optimize"])
    assert {stage: resumed[stage]["status"] for stage in ("ingest", "calibrate", "matte", "depth")} == {
        stage: "skipped" for stage in ("ingest", "calibrate", "matte", "depth")}
    assert resumed["optimize"]["status"] == "completed"
    after = _records(work)
    assert {stage: after[stage] for stage in before} == before


def test_depth_holds_out_what_optimize_will_unless_it_is_told_otherwise():
    assert depth_config(PipelineConfig()).holdout is None  # the sequence's recorded set, else auto
    assert depth_config(PipelineConfig(optimize=OptimizeConfig(holdout_cameras=["a"]))).holdout == ["a"]
    assert depth_config(PipelineConfig(optimize=OptimizeConfig(holdout_cameras=[]))).holdout == ["none"]
    assert depth_config(PipelineConfig(optimize=OptimizeConfig(holdout="paper"))).holdout == ["paper"]
    own = PipelineConfig(depth=DepthConfig(holdout="none"), optimize=OptimizeConfig(holdout=["a"]))
    assert depth_config(own) == own.depth


def test_sequence_flow_fails_on_bad_input_without_retrying(prefect_harness, tmp_path):
    bad = tmp_path / "archive" / "001" / "sequences" / "EMPTY"
    (bad / "images").mkdir(parents=True)
    state = process_sequence(str(bad), str(tmp_path / "work"), return_state=True)
    assert state.is_failed() and "no camera videos" in state.message
    with pytest.raises(Exception, match="no camera videos"):
        state.result()


def test_unknown_stage_names_are_refused_with_the_known_ones(prefect_harness, capture, tmp_path):
    state = process_sequence(str(capture.sequence_dir), str(tmp_path), stages=["ingest", "train"],
                             return_state=True)
    assert state.is_failed() and "unknown stage(s) train" in state.message and "optimize" in state.message


def test_the_run_command_runs_the_flow_and_prints_where_the_outputs_are(prefect_harness, capture, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["run", str(capture.sequence_dir), "--work", str(tmp_path), "--stages",
                                      "ingest,calibrate", "--count", "1"])
    assert result.exit_code == 0, result.output
    assert "ingest     completed" in result.output and "calibrate  completed" in result.output
    assert "reports" in result.output and "/runs/flow-run/" in result.output
    refused = CliRunner().invoke(app, ["run", str(capture.sequence_dir), "--work", str(tmp_path), "--stages", "train"])
    assert refused.exit_code == 1 and "unknown stage(s) train" in refused.output
