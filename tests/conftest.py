"""Shared fixtures. Prefect runs against its real test harness (a temporary SQLite API server)."""

import os
import tempfile

import pytest

# Before anything imports prefect: no telemetry, and a private home so tests never touch ~/.prefect.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One real Prefect API server for the whole session (starting one takes seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch pinned to one thread for a test module, restored afterwards. Small tensors gain nothing from
    threads, and on a shared 2-core runner oversubscribed OpenMP threads make small matmuls many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
