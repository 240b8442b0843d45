"""Which Prefect API the command line's flow runs report to, and where their page in the UI is.

Order: a configured ``PREFECT_API_URL`` (env or profile); else the local server ``make ui`` starts, when it
answers on 127.0.0.1:4200; else Prefect's ephemeral API in this process. The ephemeral API keeps its runs in
the same SQLite database (``~/.prefect/prefect.db``) that ``make ui`` serves, so they appear there afterwards.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

LOCAL_HOST, LOCAL_PORT = "127.0.0.1", 4200
LOCAL_UI = f"http://{LOCAL_HOST}:{LOCAL_PORT}"
LOCAL_API = f"{LOCAL_UI}/api"


def set_defaults() -> None:
    """Env defaults for CLI runs; call before prefect is imported (it reads settings on import).

    Analytics: Prefect 3 reads ``PREFECT_SERVER_ANALYTICS_ENABLED`` (``server.analytics_enabled``, the switch of
    ``prefect.server.services.telemetry``) in the server process, which inherits this environment.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # first start migrates a DB


def answers(api_url: str, timeout: float = 0.5) -> bool:
    """True if a Prefect API answers its health check at ``api_url``."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Run flows inside this to report to the configured server, else a local one, else the ephemeral API.

    Yields the API URL in use, or None for the ephemeral API.
    """
    set_defaults()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
    elif answers(LOCAL_API):
        with temporary_settings(updates={PREFECT_API_URL: LOCAL_API}):
            yield LOCAL_API
    else:
        yield None


def flow_run_page(flow_run_id: object, api_url: str | None) -> str:
    """The flow run's page in the UI (for the ephemeral API: where ``make ui`` will show it)."""
    ui = LOCAL_UI
    if api_url and api_url.rstrip("/") != LOCAL_API:
        from prefect.settings import PREFECT_UI_URL

        ui = PREFECT_UI_URL.value() or api_url.rstrip("/").removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"
