"""prefect.yaml's deployments through a real local Prefect server and a process worker, both on loopback.

The test starts ``prefect server start`` (private PREFECT_HOME, a free port), registers the deployments with
``prefect deploy --all`` as ``make deploy`` does, starts ``prefect worker start --type process`` on the cpu
pool, and runs process-archive through ``run_deployment`` with ``sequence_deployment`` set: the worker runs the
archive flow, which runs its one sequence (ingest only, a tiny capture) as a process-sequence deployment run
that the same worker picks up. The worker and the server are stopped by their process groups.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.synthetic import synthesize_capture
from storage import CaptureStore, SequenceWorkDir

PREFECT = str(Path(sys.executable).parent / "prefect")


def _flow_run_names(flow_name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return [run.name for run in runs]


@pytest.mark.slow
def test_deployments_run_on_a_process_worker(prefect_server, prefect_cli, stop_process, tmp_path):
    server, _prefect = prefect_server, prefect_cli
    capture = synthesize_capture(tmp_path / "archive", cameras=2, frames=2, width=48, height=64)
    for pool in ("cpu", "gpu"):
        _prefect(server, "work-pool", "create", pool, "--type", "process")
    deployed = _prefect(server, "deploy", "--all", timeout=120)
    for name in ("process-sequence", "optimize-sequence", "process-archive"):
        assert name in deployed

    worker_env = {**server, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cpu", "--type", "process"], env=worker_env,
                              cwd=tmp_path, stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
            run = run_deployment("process-archive/process-archive", timeout=150, poll_interval=1,
                                 parameters={"archive_root": str(capture.root), "work_root": str(tmp_path / "work"),
                                             "stages": ["ingest"], "config": {"ingest": {"count": 1, "workers": 1}},
                                             "sequence_deployment": "process-sequence/process-sequence"})
            sequence_runs = _flow_run_names("process-sequence")
    finally:
        stop_process(worker)
        worker_log.close()
    log = (tmp_path / "worker.log").read_text()
    assert run.state is not None and run.state.is_completed(), f"{run.state}\n{log[-3000:]}"
    assert sequence_runs == [f"{capture.participant_dir.name}/{capture.sequence_dir.name}"]
    work = SequenceWorkDir.for_sequence(str(tmp_path / "work"), capture.participant_dir.name,
                                        capture.sequence_dir.name)
    assert CaptureStore.open(work.capture_uri).stage_record("ingest") is not None
