"""The ``optimize-sequence`` flow: NeRSemble training alone, so it can be deployed to a ``gpu`` work pool.

``process-sequence`` runs it in-process (a subflow) by default, or as a deployment run on a GPU worker when
given ``optimize_deployment``. Either way the training sits inside a global concurrency limit (``gpu`` by
default, one slot), so one GPU trains one model at a time while the CPU stages of other sequences go on.
On a host with several GPUs, give each worker its own limit (``NERSEMBLE_GPU_LIMIT=gpu:<host>-<index>``).

Cancellation: Prefect cancels a run by sending SIGTERM to its process. While training, the stage holds that
signal (in the main thread), finishes the step, writes a checkpoint and raises ``TrainingInterrupted``; the flow
then hands the same signal back to Prefect's own handler, so the run ends as Prefect would have ended it, and
the next run resumes from the checkpoint. In a worker thread the stage cannot hold signals; it stops (with a
checkpoint) when the main thread, which received the signal, ends.
"""

from __future__ import annotations

import os
import signal
import threading

from prefect import flow, get_client, get_run_logger
from prefect.context import FlowRunContext
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from flows.figures import stage_line
from flows.progress import TrainingProgressArtifacts
from flows.tasks import optimize_task
from stages.core.interrupts import TrainingInterrupted
from stages.optimize.config import OptimizeConfig
from storage import SequenceWorkDir

GPU_LIMIT_ENV = "NERSEMBLE_GPU_LIMIT"
DEFAULT_GPU_LIMIT = "gpu"


def gpu_limit_name(requested: str | None = None) -> str:
    """The concurrency limit guarding training: the parameter, else the worker's env, else ``gpu``."""
    return requested or os.environ.get(GPU_LIMIT_ENV) or DEFAULT_GPU_LIMIT


def ensure_concurrency_limit(name: str, slots: int = 1) -> bool:
    """Create the global concurrency limit with ``slots`` if it does not exist yet; True if created.

    An existing limit is left alone: an operator may have set 2 slots for a GPU with room for two models.
    """
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            return True
        except ObjectAlreadyExists:  # another run created it a moment ago
            return False


def name_parent_task(name: str) -> None:
    """Run as a subflow, Prefect tracks this run with a task run in the parent named after the flow
    (``optimize-sequence-0``); name it after the sequence, as the other stages' task runs are. Cosmetic: a
    failure is logged, never raised."""
    context = FlowRunContext.get()
    parent = getattr(getattr(context, "flow_run", None), "parent_task_run_id", None)
    if parent is None:
        return
    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_name(parent, name)
    except Exception as error:  # noqa: BLE001 - the UI must never stop training
        get_run_logger().warning("could not name the task run of this subflow: %s", error)


def _run_name() -> str:
    work = SequenceWorkDir(flow_run.parameters["sequence_work_dir"])
    return f"{work.participant}/{work.sequence}"


@flow(name="optimize-sequence", flow_run_name=_run_name, log_prints=True)
def optimize_sequence(
    sequence_work_dir: str,
    config: OptimizeConfig = OptimizeConfig(),
    gpu_limit: str | None = None,
) -> dict:
    """Train NeRSemble on ``<work>/<PID>/<SEQ>`` (ingested, calibrated, matted; depth used when present).

    Returns the optimize report. Progress shows as one ``training-progress-*`` bar and one
    ``training-status-*`` table, both updated in place while training runs and left at the final state; the
    report (with the training curve) as ``optimize-*`` when it ends, all on the task run ``optimize <PID>/<SEQ>``.

    Args:
        sequence_work_dir: the sequence's work folder, `<work_root>/<PID>/<SEQ>` (a path or fsspec URL).
        config: the optimize stage's settings (the `optimize` section of a pipeline config).
        gpu_limit: the global concurrency limit training waits for; default: `$NERSEMBLE_GPU_LIMIT`, else
            `gpu`.
    """
    logger = get_run_logger()
    work = SequenceWorkDir(sequence_work_dir)
    name_parent_task(f"optimize-sequence {work.participant}/{work.sequence}")
    limit = gpu_limit_name(gpu_limit)
    if ensure_concurrency_limit(limit):
        logger.info("created global concurrency limit %r with 1 slot", limit)
    progress = TrainingProgressArtifacts(work.participant, work.sequence)
    logger.info("waiting for a slot of concurrency limit %r", limit)
    # The slot is a lease the client renews while training runs; a killed run's slot frees within a minute.
    with concurrency(limit, occupy=1, lease_duration=60):
        logger.info("training %s/%s (%s preset)", work.participant, work.sequence, config.preset)
        try:
            report = optimize_task(work.uri, config, progress=progress)
        except TrainingInterrupted as stopped:
            logger.warning("%s", stopped)
            if threading.current_thread() is threading.main_thread():
                signal.raise_signal(stopped.signum)  # now Prefect's handler (cancel/crash), or the default one
            raise
    progress.finish(report)
    logger.info("%s", stage_line("optimize", report))
    return report
