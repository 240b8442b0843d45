"""The archive re-run at the archive's real size: ``process-archive`` over N already-finished sequences.

Why: after fixing one capture a user re-runs the archive, and every other sequence is already finished. That
run is pure bookkeeping, and bookkeeping must not grow into hours (or into a server that drops requests) at
the NeRSemble archive's size. This builds N finished sequences cheaply (one real capture store with a record
for every stage and its ``reports/sequence.json``, copied N times; the raw side is empty camera files, which
is all discovery reads), starts a Prefect server on SQLite and one on the project's PostgreSQL
(``nersemble-pipeline server``), and runs the archive flow against each in a child process, measuring:

- ``seconds``: wall time of the ``process_archive`` call (flow run creation to its return);
- ``server_cpu_s``: CPU time of the server's process tree (the API server, and PostgreSQL with its backends);
- ``api_calls`` / ``failed_api_calls``: HTTP requests the flow's process made to the API, and those that
  failed (a transport error, or a 429 / 5xx answer), counted at the httpx layer under Prefect's retries.

Writes ``benchmarks/results/archive_scale.json`` (rows: database, sequences, seconds, failed_api_calls, ...)
and ``archive_scale.md``.

    .venv/bin/python benchmarks/archive_scale.py [--sequences 2000] [--databases postgresql,sqlite]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
PER_PARTICIPANT = 100
SERVER_START_TIMEOUT_S = 180
CHILD_TIMEOUT_S = 1200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_archive(root: Path, n: int) -> tuple[Path, Path]:
    """``root/archive`` with N sequences (empty camera files) and ``root/work`` with each one finished."""
    from flows.ledger import record_finished_sequence
    from stages.config import PipelineConfig
    from stages.table import STAGE_NAMES
    from storage import CaptureStore, SequenceWorkDir
    from storage.records import StageRecord

    archive, work_root = root / "archive", root / "work"
    template = SequenceWorkDir.for_sequence(str(root / "template"), "000", "TEMPLATE")
    os.makedirs(template.uri, exist_ok=True)
    store = CaptureStore.create(template.capture_uri, cameras=["0", "1"], n_frames=1, height=4, width=4, fps=24.0,
                                frame_indices=[0], intrinsics=None, world_2_cam=None)
    for stage in STAGE_NAMES:
        store.write_stage_record(StageRecord(stage=stage, version="bench", config_hash="bench"))
    reports = {stage: {"status": "completed"} for stage in STAGE_NAMES}
    record_finished_sequence(template, list(STAGE_NAMES), PipelineConfig(), reports, seconds=1.0)
    for i in range(n):
        participant, sequence = f"{i // PER_PARTICIPANT:03d}", f"SEQ-{i:05d}"
        images = archive / participant / "sequences" / sequence / "images"
        images.mkdir(parents=True)
        (images / "cam_0.mp4").touch()
        (images / "cam_1.mp4").touch()
        shutil.copytree(template.uri, work_root / participant / sequence)
    return archive, work_root


def _tree_cpu_s(pid: int) -> float:
    """utime + stime (+ those of reaped children) of ``pid`` and every live descendant, in seconds."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        child = int(stat.parent.name)
        stats[child] = fields
        children.setdefault(int(fields[1]), []).append(child)
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        fields = stats.get(current)
        if fields:  # fields[11..14] = utime stime cutime cstime (stat fields 14-17)
            total += sum(int(value) for value in fields[11:15]) / ticks
        todo.extend(children.get(current, []))
    return total



def start_server(database: str, home: Path) -> tuple[subprocess.Popen, str]:
    """A Prefect server on ``database`` (sqlite: ``prefect server start``; postgresql: our ``server`` command)."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    bin_dir = Path(sys.executable).parent
    if database == "sqlite":
        command = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    else:
        command = [str(bin_dir / "nersemble-pipeline"), "server", "--host", "127.0.0.1", "--port", str(port),
                   "--data", str(home / "server-data"), "--db-port", str(free_port())]
    log = open(home / f"server-{database}.log", "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    from flows.worker import readiness  # noqa: PLC0415 - the workers' own check, after sys.path is set

    api_url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while readiness(api_url, timeout=2) is not None:
        if server.poll() is not None or time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"{database} server did not start: {(home / f'server-{database}.log').read_text()[-2000:]}")
        time.sleep(0.5)
    return server, api_url


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the supervisor (it stops the API server, then PostgreSQL); SIGKILL to the group if it hangs."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def child(archive: str, work_root: str) -> None:
    """In the child process: count the API calls and failures at the httpx layer, run the flow, print JSON."""
    import httpx

    counts = {"calls": 0, "failed": 0, "errors": []}

    def failed(request, why: str) -> None:  # noqa: ANN001 - an httpx request
        counts["failed"] += 1
        counts["errors"].append(f"{request.method} {request.url.path}: {why}")

    def answered(request, response):  # noqa: ANN001, ANN202 - httpx's request and response
        if response.status_code == 429 or response.status_code >= 500:
            failed(request, str(response.status_code))
        return response

    def counted(send):  # noqa: ANN001, ANN202 - wraps httpx's send
        async def async_send(self, request, *args, **kwargs):  # noqa: ANN001, ANN202
            counts["calls"] += 1
            try:
                return answered(request, await send(self, request, *args, **kwargs))
            except Exception as error:
                failed(request, type(error).__name__)
                raise

        def sync_send(self, request, *args, **kwargs):  # noqa: ANN001, ANN202
            counts["calls"] += 1
            try:
                return answered(request, send(self, request, *args, **kwargs))
            except Exception as error:
                failed(request, type(error).__name__)
                raise

        import inspect

        return async_send if inspect.iscoroutinefunction(send) else sync_send

    httpx.AsyncClient.send = counted(httpx.AsyncClient.send)
    httpx.Client.send = counted(httpx.Client.send)

    from flows.archive import process_archive

    started = time.monotonic()
    rows = process_archive(archive, work_root)
    seconds = time.monotonic() - started
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # the run's logs are part of its API traffic
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    print("RESULT " + json.dumps({"seconds": round(seconds, 2), "statuses": statuses, "api_calls": counts["calls"],
                                  "failed_api_calls": counts["failed"], "errors": counts["errors"][:20]}), flush=True)


def measure(database: str, archive: Path, work_root: Path, home: Path) -> dict:
    server, api_url = start_server(database, home)
    try:
        cpu_before = _tree_cpu_s(server.pid)
        env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_HOME": str(home / "client-home"), "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        result = subprocess.run([sys.executable, __file__, "--child", str(archive), str(work_root)], env=env,
                                capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        process_s = time.monotonic() - started
        cpu = _tree_cpu_s(server.pid) - cpu_before
    finally:
        stop_server(server)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the archive run against {database} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    measured = json.loads(lines[-1].removeprefix("RESULT "))
    return {"database": database, "sequences": sum(measured["statuses"].values()), "seconds": measured["seconds"],
            "failed_api_calls": measured["failed_api_calls"], "api_calls": measured["api_calls"],
            "process_seconds": round(process_s, 1), "server_cpu_s": round(cpu, 1), "statuses": measured["statuses"],
            "errors": measured["errors"]}


def write_results(rows: list[dict], name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version()}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# process-archive over already-finished sequences", "",
             f"{meta['date']}, {meta['cpus']} CPUs. `seconds`: the flow call; `process s`: the client process with "
             "its start-up; server CPU: the API server and its database.", "",
             "| database | sequences | seconds | process s | server CPU s | API calls | failed API calls |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['database']} | {r['sequences']} | {r['seconds']} | {r['process_seconds']} | {r['server_cpu_s']} "
              f"| {r['api_calls']} | {r['failed_api_calls']} |" for r in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=2000)
    parser.add_argument("--databases", default="postgresql,sqlite")
    parser.add_argument("--name", default="archive_scale", help="results file name (without extension)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    # /tmp, not a private home: PostgreSQL runs as its own user when we are root and must reach its data folder.
    root = Path(tempfile.mkdtemp(prefix="archive-scale-", dir="/tmp"))
    os.chmod(root, 0o755)
    try:
        started = time.monotonic()
        archive, work_root = make_archive(root, args.sequences)
        print(f"built {args.sequences} finished sequences in {time.monotonic() - started:.1f} s", flush=True)
        rows = []
        for database in args.databases.split(","):
            row = measure(database, archive, work_root, root)
            print(json.dumps(row), flush=True)
            rows.append(row)
        write_results(rows, args.name)
        print(Path(RESULTS / f"{args.name}.md").read_text())
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
