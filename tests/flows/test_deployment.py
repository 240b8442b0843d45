"""prefect.yaml's deployments through a real local Prefect server and a process worker, both on loopback.

The test starts ``prefect server start`` (private PREFECT_HOME, a free port), registers the deployments with
``prefect deploy --all`` as ``make deploy`` does, starts ``prefect worker start --type process`` on the cpu
pool, and runs process-archive through ``run_deployment`` with ``sequence_deployment`` set: the worker runs the
archive flow, which runs its one sequence (ingest only, a tiny capture) as a process-sequence deployment run
that the same worker picks up. The worker and the server are stopped by their process groups.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.synthetic import synthesize_capture
from storage import CaptureStore, SequenceWorkDir

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")
SERVER_START_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen, signals=(signal.SIGTERM, signal.SIGINT, signal.SIGKILL)) -> None:
    """Signal the process group (the process and what it started) until it exits."""
    for sig in signals:
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_ENABLED": "false"}
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(api_url):
            if process.poll() is not None:
                pytest.fail(f"prefect server exited with {process.returncode}: "
                            f"{(tmp_path / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.skip(f"the Prefect server did not answer within {SERVER_START_TIMEOUT_S} s on this machine")
            time.sleep(0.5)
        yield env
    finally:
        _stop(process)
        log.close()


def _prefect(env: dict, *args: str, timeout: float = 60) -> str:
    result = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def _flow_run_names(flow_name: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))
    return [run.name for run in runs]


@pytest.mark.slow
def test_deployments_run_on_a_process_worker(server, tmp_path):
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
        _stop(worker)
        worker_log.close()
    log = (tmp_path / "worker.log").read_text()
    assert run.state is not None and run.state.is_completed(), f"{run.state}\n{log[-3000:]}"
    assert sequence_runs == [f"{capture.participant_dir.name}/{capture.sequence_dir.name}"]
    work = SequenceWorkDir.for_sequence(str(tmp_path / "work"), capture.participant_dir.name,
                                        capture.sequence_dir.name)
    assert CaptureStore.open(work.capture_uri).stage_record("ingest") is not None
