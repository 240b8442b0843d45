"""``nersemble-pipeline server`` / ``make server``: the Prefect server on the project's own PostgreSQL.

Why a supervisor process: the database must be up before the server migrates it, and must outlive the server
on the way down (a server stopping with its database gone logs a storm of errors and may lose its last
writes). This process starts PostgreSQL (``pipeline.server.postgres``), then ``prefect server start`` with
``PREFECT_API_DATABASE_CONNECTION_URL`` pointing at it, and on Ctrl-C or SIGTERM stops the server first and
the database last. Everything lives under one data folder: ``<data>/postgres/`` (cluster, password, log).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.server.postgres import running_cluster

DATA_ENV = "NERSEMBLE_SERVER_DATA"
DEFAULT_DATA = "server-data"


def default_data_dir() -> Path:
    """``$NERSEMBLE_SERVER_DATA``, else ``./server-data`` (a private home such as /root is out of PostgreSQL's
    reach when it runs as its own user, so the default is not under ``~``)."""
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA)


def prefect_command(host: str, port: int) -> list[str]:
    """``prefect server start`` with the prefect beside this interpreter."""
    prefect = Path(sys.executable).parent / "prefect"
    start = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    return [*start, "server", "start", "--host", host, "--port", str(port)]


def server_environment(database_url: str) -> dict[str, str]:
    """The Prefect server's environment: our database, no telemetry, a generous wait for migrations."""
    env = dict(os.environ)
    env.update({
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": env.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        # A busy server answers slowly rather than failing: the pool queues instead of raising at once.
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": env.get("PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE", "20"),
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW":
            env.get("PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW", "30"),
        "PREFECT_SERVER_DATABASE_TIMEOUT": env.get("PREFECT_SERVER_DATABASE_TIMEOUT", "30"),
        "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": env.get("PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT", "10"),
    })
    return env


def serve(data_dir: Path, host: str = "127.0.0.1", port: int = 4200, db_port: int = 5433,
          echo=print) -> int:  # noqa: ANN001 - echo(str)
    """Run PostgreSQL and the Prefect server until the server exits or we are told to stop; its exit status."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with running_cluster(data_dir / "postgres", port=db_port) as cluster:
        echo(f"PostgreSQL on {cluster.host}:{cluster.port}, data in {cluster.data_dir} (log {cluster.log_file})")
        echo(f"Prefect server and UI on http://{host}:{port}; workers elsewhere set "
             f"PREFECT_API_URL=http://<this host's address>:{port}/api (Ctrl-C stops both)")
        server = subprocess.Popen(prefect_command(host, port), env=server_environment(cluster.url()))

        def stop(signum: int, frame: object) -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)

        previous = signal.signal(signal.SIGINT, stop), signal.signal(signal.SIGTERM, stop)
        try:
            code = server.wait()
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
