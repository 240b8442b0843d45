"""The command line switches Prefect's analytics off itself: a run started without make logs no telemetry error."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.synthetic import synthesize_capture

REPO = Path(__file__).resolve().parents[2]


def _env_without_defaults(tmp_path: Path) -> dict:
    """The environment of a user's shell: no Makefile exports, no test settings, a private Prefect home."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("PREFECT_") or name == "PREFECT_HOME"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=str(REPO))
    return env


def test_importing_the_cli_switches_analytics_off_before_prefect(tmp_path):
    code = ("import os, sys; import pipeline.cli; "
            "print(os.environ.get('PREFECT_SERVER_ANALYTICS_ENABLED'), 'prefect' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], env=_env_without_defaults(tmp_path), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["false", "False"]


@pytest.mark.slow
def test_a_run_from_the_command_line_logs_no_telemetry_error(tmp_path):
    capture = synthesize_capture(tmp_path / "archive", cameras=2, frames=1, width=48, height=64)
    result = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import app; app()", "run", str(capture.sequence_dir),
         "--work", str(tmp_path / "work"), "--stages", "ingest", "--ingest-count", "1"],
        env=_env_without_defaults(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "ingest completed" in output
    assert "telemetry" not in output.lower(), output[-3000:]
