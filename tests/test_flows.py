"""The sequence flow under Prefect's real test harness: stages run, artifacts appear, re-runs skip."""

import asyncio

import pytest

from flows.sequence import process_sequence
from pipeline.config import IngestConfig, MatteConfig
from pipeline.synthetic import synthesize_capture


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    return synthesize_capture(tmp_path_factory.mktemp("archive"), cameras=3, frames=3, width=48, height=64)


async def _artifact_keys() -> set[str]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return {artifact.key for artifact in await client.read_artifacts() if artifact.key}


def test_sequence_flow_ingests_publishes_and_skips_on_rerun(prefect_harness, capture, tmp_path):
    reports = process_sequence(str(capture.sequence_dir), str(tmp_path), IngestConfig(count=2),
                               matte=MatteConfig(method="plate"))
    assert reports["ingest"]["status"] == "completed" and reports["ingest"]["frames"] == 2
    assert reports["calibrate"]["status"] == "completed" and reports["calibrate"]["resolved_mode"] == "provided"
    assert reports["matte"]["status"] == reports["depth"]["status"] == "completed"
    keys = asyncio.run(_artifact_keys())
    assert {f"{stage}-001-exp-1-head" for stage in ("ingest", "calibrate", "matte", "depth")} <= keys
    again = process_sequence(str(capture.sequence_dir), str(tmp_path), IngestConfig(count=2),
                             matte=MatteConfig(method="plate"))
    assert {report["status"] for report in again.values()} == {"skipped"}


def test_sequence_flow_fails_on_bad_input_without_retrying(prefect_harness, tmp_path):
    bad = tmp_path / "archive" / "001" / "sequences" / "EMPTY"
    (bad / "images").mkdir(parents=True)
    state = process_sequence(str(bad), str(tmp_path / "work"), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="no camera videos"):
        state.result()
