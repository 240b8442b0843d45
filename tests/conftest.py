"""Shared fixtures. Prefect runs against its real test harness (a temporary SQLite API server)."""

import os
import tempfile

import pytest

# Before anything imports prefect: no telemetry, and a private home so tests never touch ~/.prefect.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One real Prefect API server for the whole session (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
