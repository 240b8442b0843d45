"""A real ``prefect server start`` on loopback with a private home, shared by the deployment and worker tests.

``prefect_server`` yields the environment its clients need (PREFECT_API_URL, PREFECT_HOME, analytics off);
``prefect_cli`` runs ``prefect`` commands against it; ``stop_process`` signals a process group until it exits.
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
def stop_process():
    return _stop


@pytest.fixture
def prefect_server(tmp_path):
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


@pytest.fixture
def prefect_cli():
    """``prefect --no-prompt <args>`` from the repository root (as ``make deploy``); returns its stdout."""

    def run(env: dict, *args: str, timeout: float = 60) -> str:
        result = subprocess.run([PREFECT, "--no-prompt", *args], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, (f"prefect {' '.join(args)}:\n{result.stdout[-2000:]}\n"
                                        f"{result.stderr[-2000:]}")
        return result.stdout

    return run
