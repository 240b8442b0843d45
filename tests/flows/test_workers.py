"""process-archive fanned out over real process workers: two on the cpu pool, one on the gpu pool.

A temporary ``prefect server``, the deployments of prefect.yaml (``prefect deploy --all``, as ``make deploy``),
the ``gpu`` global concurrency limit with one slot, and three workers started as ``make worker`` starts them
(``python -m flows.worker``). The archive holds three tiny sequences, one with a truncated video. The archive
run sends each sequence to the cpu pool as a process-sequence deployment run, and each of those sends its
training to the gpu pool as an optimize-sequence deployment run. Afterwards: two sequences complete and the
corrupt one fails with its error in the summary; every stage ran once per sequence; no two trainings held
the gpu slot at once; a second archive run touches only the failed sequence; Ctrl-C (twice) stops each
worker cleanly.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.synthetic import synthesize_capture

REPO = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "calibrate", "matte", "optimize", "evaluate"]  # depth off: the point is the fan-out
# A model small enough to train a handful of steps in seconds on one CPU thread (as in test_flows.py).
TINY = {
    "hash.n_levels": 6, "hash.log2_table_size": 12, "rays_per_batch": 256, "target_samples_per_batch": 0,
    "images_per_batch": 2, "repeat_images": 4, "step_size": 0.12, "occupancy.warmup_steps": 4, "eval.chunk": 2048,
}
RUN_TIMEOUT_S = 600


@pytest.fixture
def archive(tmp_path) -> tuple[Path, list[str]]:
    """Participant 301 with GOOD-1, GOOD-2 and BROKEN (one camera's video cut short); and the camera serials."""
    capture = synthesize_capture(tmp_path / "archive", participant="301", sequence="GOOD-1", cameras=3, frames=2,
                                 width=48, height=64)
    sequences = capture.sequence_dir.parent
    for name in ("GOOD-2", "BROKEN"):
        shutil.copytree(capture.sequence_dir, sequences / name)
    video = sorted((sequences / "BROKEN" / "images").glob("cam_*.mp4"))[1]
    video.write_bytes(video.read_bytes()[:200])
    return capture.root, list(capture.cameras)


def _start_worker(env: dict, pool: str, name: str, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "flows.worker", "--pool", pool, "--name", name], env=env,
                            cwd=log_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _descendants(pid: int) -> list[str]:
    """Command lines of the processes below ``pid``: the Prefect worker and the flow runs it still has."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    lines = []
    for child in found:
        try:
            command = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        lines.append(f"{child}: {command}")
    return lines


def _wait_until_idle(worker: subprocess.Popen, timeout: float = 120) -> None:
    """Until the worker runs no flow: a finished run's state is final a moment before its process has exited."""
    deadline = time.monotonic() + timeout
    while len(_descendants(worker.pid)) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)


def _ctrl_c(worker: subprocess.Popen) -> int | str:
    """Ctrl-C as a terminal sends it, twice: SIGINT to the launcher's process group; its exit status.

    A worker still running a minute later is killed, so that nothing outlives the test, and described instead.
    """
    for _ in range(2):
        os.killpg(worker.pid, signal.SIGINT)
        time.sleep(0.2)
    try:
        return worker.wait(timeout=60)
    except subprocess.TimeoutExpired:
        tree = _descendants(worker.pid)
        for pid in [worker.pid, *(int(line.split(":")[0]) for line in tree)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.wait()
        return "still running 60 s after Ctrl-C, with: " + " | ".join(tree)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _flow_runs(flow_name: str) -> list:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with _client() as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def _task_runs() -> list:
    with _client() as client:
        return client.read_task_runs(limit=200)


def _summary(flow_run_id) -> dict[str, dict]:  # noqa: ANN001 - a UUID
    """The archive run's summary table, by sequence."""
    import json

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with _client() as client:
        [table] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["archive-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    rows = table.data if isinstance(table.data, list) else json.loads(table.data)
    return {row["sequence"]: row for row in rows}


def _overlaps(intervals: list[tuple[float, float]]) -> bool:
    intervals = sorted(intervals)
    return any(later[0] < earlier[1] for earlier, later in zip(intervals, intervals[1:]))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_archive_fans_out_over_cpu_and_gpu_workers(prefect_server, prefect_cli, archive, tmp_path):
    server = prefect_server
    root, cameras = archive
    for pool in ("cpu", "gpu"):
        prefect_cli(server, "work-pool", "create", pool, "--type", "process")
    prefect_cli(server, "global-concurrency-limit", "create", "gpu", "--limit", "1")
    prefect_cli(server, "deploy", "--all", timeout=180)

    worker_env = {**server, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                  "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    workers = [_start_worker(worker_env, "cpu", "cpu-1", tmp_path), _start_worker(worker_env, "cpu", "cpu-2", tmp_path),
               _start_worker(worker_env, "gpu", "gpu-1", tmp_path)]
    parameters = {
        "archive_root": str(root), "work_root": str(tmp_path / "work"), "stages": STAGES, "max_concurrent": 3,
        "sequence_deployment": "process-sequence/process-sequence",
        "optimize_deployment": "optimize-sequence/optimize-sequence",
        "config": {"ingest": {"count": 2, "workers": 1}, "matte": {"method": "plate", "workers": 1},
                   "optimize": {"steps": 6, "overrides": TINY, "holdout_cameras": [cameras[2]], "device": "cpu",
                                "encoding": "torch", "seed": 3, "threads": 1},
                   "evaluate": {"timesteps": 1, "lpips": False, "threads": 1}},
    }
    try:
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
            first = run_deployment("process-archive/process-archive", parameters=parameters,
                                   timeout=RUN_TIMEOUT_S, poll_interval=2)
            first_rows = _summary(first.id)
            sequence_runs = _flow_runs("process-sequence")
            optimize_runs = _flow_runs("optimize-sequence")
            task_runs = _task_runs()
            again = run_deployment("process-archive/process-archive", parameters=parameters,
                                   timeout=RUN_TIMEOUT_S, poll_interval=2)
            again_rows = _summary(again.id)
            sequence_runs_after = _flow_runs("process-sequence")
    finally:
        for worker in workers:
            _wait_until_idle(worker)
        exits = [_ctrl_c(worker) if worker.poll() is None else worker.returncode for worker in workers]
    logs = "\n".join(f"== {log.name}\n{log.read_text()[-2500:]}" for log in sorted(tmp_path.glob("*-?.log")))

    # Two sequences complete; the corrupt one fails, with the camera's error in the summary and the run's message.
    assert first.state.is_failed(), f"{first.state}\n{logs}"
    assert {name: row["status"] for name, row in first_rows.items()} == {
        "GOOD-1": "completed", "GOOD-2": "completed", "BROKEN": "failed"}, f"{first_rows}\n{logs}"
    assert "cam_" in first_rows["BROKEN"]["error"] and "301/BROKEN" in first.state.message
    assert all(first_rows[name]["psnr"] is not None for name in ("GOOD-1", "GOOD-2"))

    # Sequences ran as deployment runs on the cpu pool, trainings on the gpu pool.
    assert sorted(run.name for run in sequence_runs) == ["301/BROKEN", "301/GOOD-1", "301/GOOD-2"]
    assert {run.work_pool_name for run in sequence_runs} == {"cpu"}
    assert sorted(run.name for run in optimize_runs) == ["301/GOOD-1", "301/GOOD-2"]
    assert {run.work_pool_name for run in optimize_runs} == {"gpu"}

    # Every stage ran once per sequence (the broken one stopped at ingest, without retries).
    names = [run.name for run in task_runs]
    for sequence in ("GOOD-1", "GOOD-2"):
        assert all(names.count(f"{stage} 301/{sequence}") == 1 for stage in STAGES), sorted(names)
    assert names.count("ingest 301/BROKEN") == 1 and not any(n.startswith("calibrate 301/BROKEN") for n in names)
    assert all(run.run_count == 1 for run in task_runs if run.name.startswith("ingest 301/BROKEN"))

    # The gpu limit (one slot) was never exceeded: the trainings inside it never overlapped.
    trainings = [(run.start_time.timestamp(), run.end_time.timestamp()) for run in task_runs
                 if run.name.startswith("optimize 301/")]
    assert len(trainings) == 2 and not _overlaps(trainings), trainings

    # A re-run touches only the failed sequence.
    assert again.state.is_failed()
    assert {name: row["status"] for name, row in again_rows.items()} == {
        "GOOD-1": "skipped", "GOOD-2": "skipped", "BROKEN": "failed"}
    new = sorted(run.name for run in sequence_runs_after if run.id not in {r.id for r in sequence_runs})
    assert new == ["301/BROKEN"]

    # Ctrl-C stops each worker cleanly, even pressed twice: no SIGKILL.
    assert exits == [0, 0, 0], f"{exits}\n{logs}"


def _ignored_signals(pid: int) -> int:
    """The SigIgn mask of a process: bit n - 1 set when signal n is ignored by the kernel."""
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn line for {pid}")


def test_once_stopping_the_launcher_ignores_further_ctrl_c_even_while_it_exits(tmp_path):
    """After the first Ctrl-C the launcher leaves later ones to the kernel to ignore. A Python handler would not
    do: the interpreter puts the default disposition back on its way out, and a second Ctrl-C landing then
    killed the launcher with SIGINT (the archive test above saw exit -2 once)."""
    winding_down = ("import signal, sys, time; "
                    "signal.signal(signal.SIGINT, lambda *a: (time.sleep(3), sys.exit(0))); time.sleep(60)")
    script = ("import sys; import flows.worker as w; "
              f"w.worker_command = lambda args: [sys.executable, '-c', {winding_down!r}]; sys.exit(w.run_worker([]))")
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 30
        while not _descendants(launcher.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the fake worker has installed its handler
        os.kill(launcher.pid, signal.SIGINT)
        deadline = time.monotonic() + 2
        while not _ignored_signals(launcher.pid) & (1 << (signal.SIGINT - 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        ignored = _ignored_signals(launcher.pid)
        assert ignored & (1 << (signal.SIGINT - 1)) and ignored & (1 << (signal.SIGTERM - 1))
        assert launcher.wait(timeout=30) == 0  # the worker wound down and exited 0; so does the launcher
    finally:
        if launcher.poll() is None:
            launcher.kill()
