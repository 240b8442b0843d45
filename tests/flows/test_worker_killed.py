"""A gpu worker SIGKILLed mid-training: its flow run ends Crashed, and the re-run resumes from the checkpoint.

A temporary ``prefect server`` (SQLite on loopback is enough here: the fault is the worker's, not the
database's), the optimize-sequence deployment of prefect.yaml, and a gpu worker started as ``make worker``
starts it (``python -m flows.worker``), which turns on flow-run heartbeats and creates the automation that
crashes runs whose heartbeats stop (flows/heartbeats.py). Ingest, calibrate and matte run here beforehand.
Once training has written its first checkpoint the test SIGKILLs the worker's whole process tree (launcher,
Prefect worker, flow run) as a dying machine would. The run must end Crashed within the heartbeat window;
a new worker then runs the deployment again, which must resume from the newest checkpoint and train to the
requested step count, with the upstream stages untouched. Heartbeats come every 30 s (Prefect's minimum) and
the window is 60 s here, against 60 s and 300 s by default, so the test waits about a minute for the crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.heartbeats import (DEFAULT_HEARTBEAT_S, HEARTBEAT_ENV, LEGACY_HEARTBEAT_ENV, heartbeat_automation,
                              with_heartbeats)
from pipeline.synthetic import synthesize_capture
from stages.calibrate.stage import calibrate_sequence
from stages.ingest.config import IngestConfig
from stages.ingest.stage import ingest_sequence
from stages.matte.config import MatteConfig
from stages.matte.stage import matte_sequence
from stages.rendering.checkpoints import checkpoint_steps
from storage import CaptureStore, SequenceWorkDir

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = ("ingest", "calibrate", "matte")
# A model small enough for about 30 ms a step on one CPU thread (as in test_flows.py); 600 steps last long
# enough that the kill lands mid-training, a checkpoint every 50 steps soon enough that one exists by then.
TINY = {
    "hash.n_levels": 6, "hash.log2_table_size": 12, "rays_per_batch": 256, "target_samples_per_batch": 0,
    "images_per_batch": 2, "repeat_images": 4, "step_size": 0.12, "occupancy.warmup_steps": 4, "eval.chunk": 2048,
}
STEPS, CHECKPOINT_EVERY = 600, 50
HEARTBEAT_S, WINDOW_S = 30, 60
CHECKPOINT_TIMEOUT_S = 240  # worker start, flow-run start (imports torch), training to the first checkpoint
CRASH_TIMEOUT_S = WINDOW_S + 75  # the window after the last heartbeat, plus the server's evaluation and actions
RERUN_TIMEOUT_S = 360  # the crashed run's gpu slot lease (60 s) runs out, then the rest of the training


@pytest.fixture
def trained_upstream(tmp_path) -> tuple[SequenceWorkDir, list[str]]:
    """Participant 401, sequence KILL-1, ingested, calibrated and matted: ready for optimize; and its cameras."""
    capture = synthesize_capture(tmp_path / "archive", participant="401", sequence="KILL-1", cameras=3, frames=2,
                                 width=48, height=64)
    ingest_sequence(str(capture.sequence_dir), str(tmp_path / "work"), IngestConfig(count=2, workers=1))
    work = SequenceWorkDir.for_sequence(str(tmp_path / "work"), "401", "KILL-1")
    calibrate_sequence(work.uri)
    matte_sequence(work.uri, MatteConfig(method="plate", workers=1))
    return work, list(capture.cameras)


def _start_worker(env: dict, name: str, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "flows.worker", "--pool", "gpu", "--name", name], env=env,
                            cwd=log_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it (by parent links in /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(process: subprocess.Popen) -> list[int]:
    """SIGKILL a process and all below it, as a machine dying would end them; the PIDs killed.

    Every process is stopped first, so none of them can start another or react while the others die.
    """
    pids = _tree(process.pid)
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    process.wait(timeout=30)
    return pids


def _gone(pids: list[int]) -> bool:
    """True when none of ``pids`` runs any more (a zombie awaiting its parent counts as gone)."""
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            return False
    return True


def _flow_run(run_id):  # noqa: ANN001, ANN202 - a UUID; a FlowRun
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def _wait(predicate, timeout: float, what: str, logs) -> float:  # noqa: ANN001 - callables
    """Poll ``predicate`` every half second; the seconds it took, or a failure saying what did not happen."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} within {timeout:.0f} s\n{logs()}")
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_worker_killed_mid_training_ends_crashed_and_the_rerun_resumes(prefect_server, prefect_cli,
                                                                          trained_upstream, tmp_path):
    server = prefect_server
    work, cameras = trained_upstream
    records_before = {stage: CaptureStore.open(work.capture_uri).stage_record(stage) for stage in UPSTREAM}
    prefect_cli(server, "work-pool", "create", "gpu", "--type", "process")
    prefect_cli(server, "deploy", "--name", "optimize-sequence", timeout=180)

    worker_env = {**server, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                  "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), "NERSEMBLE_HEARTBEAT_WINDOW_S": str(WINDOW_S),
                  "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    parameters = {"sequence_work_dir": work.uri, "config": {
        "steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY, "overrides": TINY, "holdout_cameras": [cameras[2]],
        "device": "cpu", "encoding": "torch", "seed": 3, "threads": 1}}
    workers: list[subprocess.Popen] = []

    def logs() -> str:
        return "\n".join(f"== {log.name}\n{log.read_text(errors='replace')[-3000:]}"
                         for log in sorted(tmp_path.glob("gpu-*.log")))

    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
            workers.append(_start_worker(worker_env, "gpu-1", tmp_path))
            first = run_deployment("optimize-sequence/optimize-sequence", parameters=parameters, timeout=0)

            def checkpointed() -> bool:
                state = _flow_run(first.id).state
                assert state is None or not state.is_final(), f"the first run ended before the kill: {state}"
                return bool(checkpoint_steps(work))

            _wait(checkpointed, CHECKPOINT_TIMEOUT_S, "a first checkpoint", logs)
            killed = _kill_tree(workers[0])
            at_kill = checkpoint_steps(work)
            assert _flow_run(first.id).state.type == StateType.RUNNING
            assert len(killed) >= 3, f"launcher, worker and flow run expected, killed {killed}"
            assert _gone(killed)

            crashed_after = _wait(lambda: _flow_run(first.id).state.type != StateType.RUNNING, CRASH_TIMEOUT_S,
                                  "the killed run leaving Running", logs)
            crashed = _flow_run(first.id).state
            print(f"killed at checkpoint steps {at_kill}; run left Running {crashed_after:.0f} s after the kill")

            workers.append(_start_worker(worker_env, "gpu-2", tmp_path))  # the machine back, or another one
            again = run_deployment("optimize-sequence/optimize-sequence", parameters=parameters,
                                   timeout=RERUN_TIMEOUT_S, poll_interval=2)
    finally:
        for worker in workers:
            if worker.poll() is None:
                _kill_tree(worker)

    # The dead worker's run ended Crashed, by the automation, within the window (plus the server's evaluation).
    assert crashed.type == StateType.CRASHED, f"{crashed}\n{logs()}"
    assert "heartbeat" in (crashed.message or ""), crashed.message
    assert crashed_after < CRASH_TIMEOUT_S
    assert "created the automation" in (tmp_path / "gpu-1.log").read_text()

    # The re-run resumed from the newest checkpoint on disk at the kill and trained to the requested steps.
    assert again.state.is_completed(), f"{again.state}\n{logs()}"
    report = work.read_report("optimize")
    assert report["resumed_from_step"] == max(at_kill) > 0, (report["resumed_from_step"], at_kill)
    assert report["steps"] == STEPS and report["status"] == "completed", report
    assert (work.read_text("nersemble/train.log") or "").count("resumed from step") == 1

    # Each finished stage ran once: the upstream records are the ones written before, and training finished once.
    store = CaptureStore.open(work.capture_uri)
    assert {stage: store.stage_record(stage) for stage in UPSTREAM} == records_before
    assert store.stage_record("optimize") is not None
    from prefect.client.orchestration import get_client

    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        automations = client.read_automations()
    assert sorted(run.state.type.value for run in runs) == ["COMPLETED", "CRASHED"], runs
    assert len(automations) == 1  # two workers started, one automation


def test_workers_turn_heartbeats_on_unless_the_environment_sets_them():
    assert with_heartbeats({}) == {HEARTBEAT_ENV: str(DEFAULT_HEARTBEAT_S)}
    assert with_heartbeats({HEARTBEAT_ENV: "120"})[HEARTBEAT_ENV] == "120"
    assert HEARTBEAT_ENV not in with_heartbeats({LEGACY_HEARTBEAT_ENV: "45"})
    from pydantic import ValidationError
    from prefect.settings.models.flows import FlowsSettings

    # This Prefect accepts our period, and refuses one below its minimum (every setting would fail to load).
    assert FlowsSettings(heartbeat_frequency=DEFAULT_HEARTBEAT_S).heartbeat_frequency == DEFAULT_HEARTBEAT_S
    with pytest.raises(ValidationError):
        FlowsSettings(heartbeat_frequency=29)


def test_the_automation_crashes_a_flow_run_whose_heartbeats_stop_within_the_window():
    automation = heartbeat_automation(window=90)
    trigger, [action] = automation.trigger, automation.actions
    assert trigger.posture == "Proactive" and trigger.within.total_seconds() == 90
    assert trigger.after == {"prefect.flow-run.heartbeat"} and "prefect.flow-run.heartbeat" in trigger.expect
    assert {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    assert action.type == "change-flow-run-state" and action.state.value == "CRASHED"
