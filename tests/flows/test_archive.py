"""The archive flow under Prefect's real test harness: broken captures are isolated, finished ones skipped.

Sequences run only ingest and calibrate here: the point is the batch logic, and the full stage chain is
covered by test_flows.py.
"""

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prefect.logging.handlers import APILogHandler

from flows.archive import process_archive
from stages.config import PipelineConfig
from stages.ingest.config import IngestConfig
from pipeline.synthetic import synthesize_capture
from stages.core.video import encode_video
from storage import CaptureStore, SequenceWorkDir

EARLY = ["ingest", "calibrate"]
FAST = PipelineConfig(ingest=IngestConfig(count=2, workers=1))


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """Participant 201 with GOOD-1, GOOD-2 and BROKEN (one camera's video cut short to garbage)."""
    root = tmp_path_factory.mktemp("archive")
    capture = synthesize_capture(root, participant="201", sequence="GOOD-1", cameras=3, frames=2, width=48,
                                 height=64)
    sequences = capture.sequence_dir.parent
    for name in ("GOOD-2", "BROKEN"):
        shutil.copytree(capture.sequence_dir, sequences / name)
    video = sorted((sequences / "BROKEN" / "images").glob("cam_*.mp4"))[1]
    video.write_bytes(video.read_bytes()[:200])
    return root


async def _sequence_run_names() -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["process-sequence"])))
        return [run.name for run in runs]


async def _summary_rows() -> list[dict]:
    """The latest version of the archive run's summary table."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async with get_client() as client:
        [table] = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["archive-summary"])), sort=ArtifactSort.CREATED_DESC, limit=1)
    return table.data if isinstance(table.data, list) else json.loads(table.data)


def _records(work_root: Path, participant: str, sequence: str) -> dict[str, str]:
    work = SequenceWorkDir.for_sequence(str(work_root), participant, sequence)
    if not CaptureStore.exists(work.capture_uri):
        return {}
    return {name: r.finished_at for name, r in CaptureStore.open(work.capture_uri).stage_records().items()}


def test_one_corrupt_capture_fails_alone_and_a_rerun_touches_only_it(prefect_harness, archive, tmp_path):
    state = process_archive(str(archive), str(tmp_path), config=FAST, stages=EARLY, max_concurrent=2,
                            return_state=True)
    assert state.is_failed()
    assert "1 of 3 sequence(s) failed" in state.message and "201/BROKEN" in state.message
    rows = {row["sequence"]: row for row in asyncio.run(_summary_rows())}
    assert {name: row["status"] for name, row in rows.items()} == {
        "BROKEN": "failed", "GOOD-1": "completed", "GOOD-2": "completed"}
    assert "cam_" in rows["BROKEN"]["error"] and rows["GOOD-1"]["error"] is None
    assert rows["GOOD-1"]["seconds"] > 0 and set(rows["GOOD-1"]) >= {"status", "seconds", "psnr", "error"}
    done = {name: _records(tmp_path, "201", name) for name in ("GOOD-1", "GOOD-2")}
    assert all(set(records) == set(EARLY) for records in done.values())
    assert "ingest" not in _records(tmp_path, "201", "BROKEN")
    runs_before = asyncio.run(_sequence_run_names())

    again = process_archive(str(archive), str(tmp_path), config=FAST, stages=EARLY, return_state=True)
    assert again.is_failed()
    rows = {row["sequence"]: row for row in asyncio.run(_summary_rows())}
    assert {name: row["status"] for name, row in rows.items()} == {
        "BROKEN": "failed", "GOOD-1": "skipped", "GOOD-2": "skipped"}
    runs_after = asyncio.run(_sequence_run_names())
    new = list(runs_after)
    for name in runs_before:
        new.remove(name)
    assert new == ["201/BROKEN"]
    assert {name: _records(tmp_path, "201", name) for name in ("GOOD-1", "GOOD-2")} == done


def test_a_missing_archive_root_is_a_clear_failure(prefect_harness, tmp_path):
    state = process_archive(str(tmp_path / "no-such-archive"), str(tmp_path / "work"), return_state=True)
    assert state.is_failed() and "archive folder not found" in state.message


def test_an_unknown_participant_fails_without_losing_the_others(prefect_harness, archive, tmp_path):
    state = process_archive(str(archive), str(tmp_path), participants=["201", "999"], sequences=["GOOD-1"],
                            config=FAST, stages=["ingest"], return_state=True)
    assert state.is_failed() and "participant '999' not found" in state.message and "201" in state.message
    rows = asyncio.run(_summary_rows())
    assert {(row["participant"], row["sequence"], row["status"]) for row in rows} == {
        ("999", "*", "failed"), ("201", "GOOD-1", "completed")}
    assert set(_records(tmp_path, "201", "GOOD-1")) == {"ingest"}


def test_a_capture_without_calibration_or_texture_fails_clearly_and_alone(prefect_harness, archive, tmp_path):
    """Nothing to take the cameras from and nothing to estimate them with: calibrate says so; 201 completes."""
    root = tmp_path / "archive"
    shutil.copytree(archive / "201" / "sequences" / "GOOD-1", root / "201" / "sequences" / "GOOD-1")
    shutil.copytree(archive / "201" / "calibration", root / "201" / "calibration")
    flat = [np.full((64, 48, 3), 128, np.uint8)] * 2
    for serial in ("222200037", "222200042", "221501007"):
        encode_video(root / "302" / "sequences" / "FLAT" / "images" / f"cam_{serial}.mp4", flat, fps=73.0)
    state = process_archive(str(root), str(tmp_path / "work"), config=FAST, stages=EARLY, return_state=True)
    assert state.is_failed() and "302/FLAT" in state.message and "not registered" in state.message
    rows = {row["sequence"]: row for row in asyncio.run(_summary_rows())}
    assert rows["GOOD-1"]["status"] == "completed" and rows["FLAT"]["status"] == "failed"
    assert "CalibrationError" in rows["FLAT"]["error"]
    assert set(_records(tmp_path / "work", "201", "GOOD-1")) == set(EARLY)
    assert "calibrate" not in _records(tmp_path / "work", "302", "FLAT")
    APILogHandler().flush()  # the log worker sends batches in the background: send what is queued now
    logs = asyncio.run(_log_messages(state.state_details.flow_run_id))
    assert any("302/FLAT failed" in line and "not registered" in line for line in logs)


async def _log_messages(flow_run_id) -> list[str]:  # noqa: ANN001 - a UUID
    """The flow run's log lines as the UI shows them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def test_the_archive_command_prints_the_summary_and_exits_1_on_failures(prefect_harness, archive, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["archive", str(archive), "--work", str(tmp_path), "--stages", "ingest",
                                      "--count", "1", "--sequence", "GOOD-2,BROKEN"])
    assert result.exit_code == 1, result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert ["201", "GOOD-2", "completed"] == lines[[i for i, l in enumerate(lines) if "GOOD-2" in l][0]][:3]
    assert any(line[:3] == ["201", "BROKEN", "failed"] for line in lines)
    assert "flow run: http" in result.output
