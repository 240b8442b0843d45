"""The archive over hosts: a Prefect server on PostgreSQL, two cpu workers and a gpu worker, each host a network
namespace with its own address, sharing the archive and work roots by path (as an NFS mount would).

One cluster, three faults on it, because starting one costs a minute of a 2-core CI machine:

- two archive runs started at once over the same archive: each sequence is processed by one of them, the other
  says ``running elsewhere`` (or ``skipped`` once it was finished);
- the server host dies (every process on it SIGKILLed: the API server and PostgreSQL) while those runs go on,
  and comes back: the runs finish, or a re-run finishes them; no stage ran twice; nothing written is lost;
- the gpu concurrency limit (one slot) held throughout: no two trainings overlapped.

The database outage seen by workers (one line, then polling again) is in ``test_worker_database.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flows.worker import readiness
from pipeline.synthetic import synthesize_capture

_spec = importlib.util.spec_from_file_location("cluster_netns", Path(__file__).with_name("netns.py"))
netns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netns)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STAGES = ["ingest", "calibrate", "matte", "optimize"]
SEQUENCES = ["SEQ-1", "SEQ-2", "SEQ-3"]
TINY = {
    "hash.n_levels": 6, "hash.log2_table_size": 12, "rays_per_batch": 256, "target_samples_per_batch": 0,
    "images_per_batch": 2, "repeat_images": 4, "step_size": 0.12, "occupancy.warmup_steps": 4, "eval.chunk": 2048,
}
SERVER_READY_S = 240
RUNS_S = 540



class Cluster:
    """The hosts, the server and the workers; every process started here is killed by ``close()``."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.net = netns.TestNetwork()
        self.server_address = self.net.add_host("server", 2)
        for octet, name in enumerate(("cpu-1", "cpu-2", "gpu-1"), start=11):
            self.net.add_host(name, octet)
        # PostgreSQL runs as its own user when we are root: its data folder must not sit under pytest's 0700 tmp.
        self.server_data = Path(tempfile.mkdtemp(prefix="nersemble-cluster-", dir="/tmp"))
        os.chmod(self.server_data, 0o755)
        self.api_url = f"http://{self.server_address}:4200/api"
        self.env = {**os.environ, "PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "client-home"),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.server: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.server_starts = 0

    def start_server(self) -> None:
        self.server_starts += 1
        log = open(self.tmp / f"server-{self.server_starts}.log", "wb")
        env = {**self.env, "PREFECT_HOME": str(self.tmp / "server-home")}
        self.server = subprocess.Popen(
            self.net.command("server", [str(BIN / "nersemble-pipeline"), "server", "--host", self.server_address,
                                        "--port", "4200", "--data", str(self.server_data), "--db-port", "5433"]),
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.tmp)
        deadline = time.monotonic() + SERVER_READY_S
        while readiness(self.api_url, timeout=2) is not None:
            if self.server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not become ready: {self.logs('server-*.log')}")
            time.sleep(0.5)

    def kill_server_host(self) -> None:
        """The server machine dies: the API server and PostgreSQL, SIGKILLed mid-write."""
        self.net.kill_host("server")
        if self.server is not None:
            self.server.wait(timeout=30)

    def start_worker(self, name: str, pool: str) -> None:
        log = open(self.tmp / f"worker-{name}.log", "wb")
        env = {**self.env, "PREFECT_HOME": str(self.tmp / f"home-{name}"), "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        self.workers.append(subprocess.Popen(
            self.net.command(name, [sys.executable, "-m", "flows.worker", "--pool", pool, "--name", name]),
            env=env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def cli(self, *args: str, timeout: float = 180) -> str:
        result = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=self.env, cwd=REPO,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        return result.stdout

    def logs(self, pattern: str = "*.log") -> str:
        return "\n".join(f"== {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                         for log in sorted(self.tmp.glob(pattern)))

    def close(self) -> None:
        try:
            self.net.close()
        finally:
            for process in [self.server, *self.workers]:
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait(timeout=30)
            shutil.rmtree(self.server_data, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    why = netns.unavailable()
    if why:
        pytest.skip(f"workers on other hosts need network namespaces: {why}")
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def archive(tmp_path) -> tuple[Path, list[str]]:
    capture = synthesize_capture(tmp_path / "archive", participant="401", sequence=SEQUENCES[0], cameras=3,
                                 frames=2, width=48, height=64)
    for name in SEQUENCES[1:]:
        shutil.copytree(capture.sequence_dir, capture.sequence_dir.parent / name)
    return capture.root, list(capture.cameras)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_final(run_ids: list, deadline: float) -> dict:
    """Flow run id -> its final state (or the last one seen when the deadline passed)."""
    states = {}
    while True:
        with _client() as client:
            for run_id in run_ids:
                try:
                    states[run_id] = client.read_flow_run(run_id).state
                except Exception:  # noqa: BLE001 - the server may be restarting
                    pass
        if all(run_id in states and states[run_id].is_final() for run_id in run_ids) or time.monotonic() > deadline:
            return states
        time.sleep(2)


def _summary(client, flow_run_id) -> dict[str, dict]:  # noqa: ANN001
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    tables = client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=["archive-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    if not tables:
        return {}
    data = tables[0].data
    rows = data if isinstance(data, list) else json.loads(data)
    return {row["sequence"]: row for row in rows}


def _overlaps(intervals: list[tuple[float, float]]) -> bool:
    intervals = sorted(intervals)
    return any(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:]))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_archive_over_hosts_survives_a_server_death_and_a_second_archive_run(cluster, archive, tmp_path):
    root, cameras = archive
    work_root = tmp_path / "work"
    cluster.start_server()
    for pool in ("cpu", "gpu"):
        cluster.cli("work-pool", "create", pool, "--type", "process")
    cluster.cli("global-concurrency-limit", "create", "gpu", "--limit", "1")
    cluster.cli("deploy", "--all")
    for name, pool in (("cpu-1", "cpu"), ("cpu-2", "cpu"), ("gpu-1", "gpu")):
        cluster.start_worker(name, pool)

    parameters = {
        "archive_root": str(root), "work_root": str(work_root), "stages": STAGES, "max_concurrent": 3,
        "sequence_deployment": "process-sequence/process-sequence",
        "optimize_deployment": "optimize-sequence/optimize-sequence",
        "config": {"ingest": {"count": 2, "workers": 1}, "matte": {"method": "plate", "workers": 1},
                   "optimize": {"steps": 6, "overrides": TINY, "holdout_cameras": [cameras[2]], "device": "cpu",
                                "encoding": "torch", "seed": 3, "threads": 1, "checkpoint_every": 2}},
    }
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: cluster.api_url}):
        # Two people start the archive at the same moment.
        runs = [run_deployment("process-archive/process-archive", parameters=parameters, timeout=0)
                for _ in range(2)]
        # The server machine dies once the first sequence is being written, and comes back a few seconds later.
        deadline = time.monotonic() + 240
        while not any((work_root / "401" / name / "capture.zarr").exists() for name in SEQUENCES):
            assert time.monotonic() < deadline, f"no sequence started within 240 s\n{cluster.logs()}"
            time.sleep(0.5)
        cluster.kill_server_host()
        time.sleep(3)
        cluster.start_server()
        states = _wait_final([run.id for run in runs], time.monotonic() + RUNS_S)
        unfinished = [run_id for run_id, state in states.items() if not state.is_completed()]
        rerun = None
        if unfinished:  # a run the outage broke: a re-run finishes what it left
            rerun = run_deployment("process-archive/process-archive", parameters=parameters, timeout=RUNS_S,
                                   poll_interval=2)
        with _client() as client:
            summaries = [_summary(client, run.id) for run in runs]
            rerun_summary = _summary(client, rerun.id) if rerun else {}
            task_runs = client.read_task_runs(limit=200)
            archive_runs = [client.read_flow_run(run.id) for run in runs]
    logs = cluster.logs()
    if rerun is not None:
        assert rerun.state.is_completed(), f"the re-run did not finish the archive: {rerun.state}\n{logs}"

    # Nothing written was lost: the runs created before the server died are still known to it after.
    assert all(run.id == created.id for run, created in zip(archive_runs, runs))
    # Every sequence finished, with every stage's record and its training checkpoints in place.
    from storage import CaptureStore, SequenceWorkDir

    for name in SEQUENCES:
        work = SequenceWorkDir.for_sequence(str(work_root), "401", name)
        summary = work.read_report("sequence") or {}
        assert summary.get("status") == "completed", f"{name}: {summary}\n{logs}"
        assert set(STAGES) <= set(CaptureStore.open(work.capture_uri).stage_records())
        assert list(Path(work.path("nersemble", "checkpoints")).glob("step-*.pt"))

    # Each sequence was processed by one archive run; the other one said it was running elsewhere (or, once it
    # was finished, skipped it).
    # A sequence run that started while the server was down can crash (its engine cannot reach the API): that
    # row is failed, and the re-run completes it.
    for name in SEQUENCES:
        statuses = [summary[name]["status"] for summary in [*summaries, rerun_summary] if name in summary]
        assert statuses.count("completed") == 1, (name, statuses, summaries, rerun_summary)
        assert set(statuses) <= {"completed", "running elsewhere", "skipped", "failed"}, (name, statuses)
        if "failed" in statuses:
            assert rerun_summary.get(name, {}).get("status") == "completed", (name, statuses, rerun_summary)
    assert "is being processed by another archive run" in worker_logs(cluster, "worker-cpu-*.log"), logs

    # No stage ran twice: each stage of each sequence logged "completed" once, in the worker that ran it (the
    # sequence runs on the cpu workers; the training on the gpu worker, whose optimize-sequence run says so).
    cpu_logs, gpu_logs = worker_logs(cluster, "worker-cpu-*.log"), worker_logs(cluster, "worker-gpu-*.log")
    for name in SEQUENCES:
        for stage in STAGES:
            ran = re.findall(rf"Flow run '401/{re.escape(name)}' - {stage} completed",
                             gpu_logs if stage == "optimize" else cpu_logs)
            assert len(ran) == 1, f"{stage} of {name} ran {len(ran)} times\n{logs}"

    # The gpu limit held: no two trainings overlapped.
    trainings = [(run.start_time.timestamp(), run.end_time.timestamp()) for run in task_runs
                 if run.name.startswith("optimize 401/") and run.start_time and run.end_time]
    assert trainings and not _overlaps(trainings), trainings


def worker_logs(cluster: Cluster, pattern: str) -> str:
    """Whole worker logs (the flow runs they started print there), not only the tails."""
    return "\n".join(log.read_text(errors="replace") for log in sorted(cluster.tmp.glob(pattern)))
