"""The ``process-archive`` flow: every (participant, sequence) under an archive root, one sequence run each.

Sequences whose last run finished with the same stages and configs are skipped (``reports/sequence.json``, see
``flows.ledger``). The rest run as ``process-sequence`` subflows in this process, or as deployment runs on a
work pool (``sequence_deployment``), at most ``max_concurrent`` at a time. A sequence that fails is a row in
the summary, never the end of the batch; the archive run itself ends Failed when any sequence failed, with
their errors in its message, after the summary table artifact is written.

A finished sequence costs one cheap check (its ``reports/sequence.json`` and store records) and nothing else:
no task run, no API call, no walk of its store; a re-run over a large archive is bookkeeping, so it must stay
proportional to the sequences that still need work. Two archive runs over one archive share the work: a run
claims a sequence (``<work>/<PID>/<SEQ>/.archive-claim``, a kernel lock held while its sequence run goes on and
dropped when the holder dies) before running it; a sequence claimed by another run is a ``running elsewhere``
row here, and one that another run finished in the meantime is ``skipped``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_archive_summary
from flows.ledger import SEQUENCE_REPORT, finished_sequence
from flows.sequence import check_stages, process_sequence
from stages.config import PipelineConfig
from stages.core.errors import PipelineError
from stages.core.interrupts import forward_stop_signals
from stages.core.raw_capture import list_archive
from storage import SequenceWorkDir

CLAIM_LOCK = ".archive-claim"
RUNNING_ELSEWHERE = "running elsewhere"
SUMMARY_COLUMNS = ("participant", "sequence", "status", "seconds", "psnr", "error", "flow_run", "store_bytes",
                   "dropped_bytes")


class ArchiveFailures(PipelineError):
    """Some sequences of an archive run failed; the others finished (``rows``: the whole summary)."""

    def __init__(self, message: str, rows: list[dict] | None = None):
        super().__init__(message)
        self.rows = rows or []

    def __reduce__(self):  # noqa: ANN204 - keeps the rows when the exception is pickled into a result
        return type(self), (str(self), self.rows)


def _run_name() -> str:
    root = Path(flow_run.parameters["archive_root"])
    return f"archive {root.name or root}"


def _row(participant: str, sequence: str, status: str, seconds: float | None = None, psnr: float | None = None,
         error: str | None = None, flow_run: str | None = None) -> dict:
    return {"participant": participant, "sequence": sequence, "status": status,
            "seconds": None if seconds is None else round(seconds, 1), "psnr": psnr, "error": error,
            "flow_run": flow_run}


def _one_line(text: str) -> str:
    """A multi-line message as one summary-row line: every non-empty line kept (the camera and file too)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _error_text(state) -> str:  # noqa: ANN001 - a prefect State
    """The exception behind a failed local run ("Type: message"), else the state's message, on one line."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception as raised:  # noqa: BLE001 - a crashed run may not even have a result
        error = raised
    if isinstance(error, BaseException):
        return _one_line(f"{type(error).__name__}: {error}")
    return _one_line(state.message or state.name)


def _psnr_of(work: SequenceWorkDir) -> float | None:
    summary = work.read_report(SEQUENCE_REPORT) or {}
    return summary.get("psnr")


def _storage(work_root: str, row: dict, drop_arrays: bool) -> dict:
    """The row with its store's bytes, after dropping its arrays when asked and its export has succeeded.

    A sequence another run holds the lock of is left as it is; it is dropped by a later archive run. Rows of
    sequences this run did not process are not measured (walking every store of a large archive would make a
    re-run cost what the archive weighs) unless arrays are to be dropped.
    """
    from storage import CaptureStore, SequenceLockedError, sequence_lock
    from storage.lifecycle import drop_arrays as drop, dropped_arrays, tree_bytes

    work = SequenceWorkDir.for_sequence(work_root, row["participant"], row["sequence"])
    if row["status"] not in ("completed", "failed") and not drop_arrays:
        return {**row, "store_bytes": None, "dropped_bytes": None}
    if "*" in (row["participant"], row["sequence"]) or not CaptureStore.exists(work.capture_uri):
        return {**row, "store_bytes": None, "dropped_bytes": None}
    freed = None
    if drop_arrays and row["status"] != "failed":
        try:
            with sequence_lock(work.uri):
                store = CaptureStore.open(work.capture_uri, mode="r+")
                if "export" in store.stage_records() and not dropped_arrays(store):
                    freed = drop(store, reason="dropped by process-archive after a successful export")
        except SequenceLockedError as error:
            get_run_logger().warning("%s/%s: arrays not dropped: %s", row["participant"], row["sequence"], error)
    return {**row, "store_bytes": tree_bytes(work.capture_uri), "dropped_bytes": freed}


def _holder_text(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"
            if holder else "a run that has not written its details yet")


@task(name="sequence", task_run_name="{participant}/{sequence}", cache_policy=NO_CACHE)
def run_sequence(participant: str, sequence: str, raw_sequence_dir: str, work_root: str, parameters: dict,
                 sequence_deployment: str | None = None) -> dict:
    """One sequence as a subflow (or a deployment run), under this run's claim on it; always returns its row.

    Another archive run holding the claim: a ``running elsewhere`` row, at once (waiting would only idle this
    run's slot while the other does the work). The claim won: the sequence is checked again, since another run
    may have finished it between this run's listing and now.
    """
    from storage import SequenceLockedError, sequence_lock

    work = SequenceWorkDir.for_sequence(work_root, participant, sequence)
    try:
        with sequence_lock(work.uri, create=True, lock_name=CLAIM_LOCK):
            done = finished_sequence(work, parameters["stages"], parameters["config"])
            if done is not None:
                get_run_logger().info("%s/%s was finished by another archive run meanwhile; skipped",
                                      participant, sequence)
                return _row(participant, sequence, "skipped", 0.0, psnr=done.get("psnr"))
            return _run_claimed(participant, sequence, raw_sequence_dir, work_root, parameters, sequence_deployment)
    except SequenceLockedError as busy:
        get_run_logger().warning("%s/%s is being processed by another archive run (%s); skipped here",
                                 participant, sequence, _holder_text(busy.holder))
        return _row(participant, sequence, RUNNING_ELSEWHERE, 0.0,
                    error=f"claimed by another archive run ({_holder_text(busy.holder)})")


def _run_claimed(participant: str, sequence: str, raw_sequence_dir: str, work_root: str, parameters: dict,
                 sequence_deployment: str | None) -> dict:
    """Run one claimed sequence; its summary row, failed or not."""
    started = time.monotonic()
    work = SequenceWorkDir.for_sequence(work_root, participant, sequence)
    if sequence_deployment:
        from prefect.deployments import run_deployment

        jsonable = {name: value.model_dump(mode="json") if hasattr(value, "model_dump") else value
                    for name, value in parameters.items()}
        run = run_deployment(sequence_deployment, timeout=None, poll_interval=5,
                             parameters={"raw_sequence_dir": raw_sequence_dir, "work_root": work_root, **jsonable})
        state, run_name = run.state, run.name
        failed = state is None or not state.is_completed()
        error = (f"{state.name if state else 'unknown'}: {state.message if state else ''}") if failed else None
    else:
        state = process_sequence(raw_sequence_dir, work_root, **parameters, return_state=True)
        run_name = str(state.state_details.flow_run_id) if state.state_details else None
        failed = not state.is_completed()
        error = _error_text(state) if failed else None
    seconds = time.monotonic() - started
    if failed:
        return _row(participant, sequence, "failed", seconds, error=error, flow_run=run_name)
    return _row(participant, sequence, "completed", seconds, psnr=_psnr_of(work), flow_run=run_name)


def _location(problem: str, root: Path) -> tuple[str, str]:
    """(participant, sequence) named by a discovery problem's path, for its summary row."""
    match = re.search(re.escape(str(root)) + r"/([^/]+)/sequences/([^/:]+)", problem)
    return (match.group(1), match.group(2)) if match else ("?", "?")


def _unknown_filters(root: Path, participants: list[str] | None, sequences: list[str] | None,
                     found: list) -> list[dict]:
    """Rows for participants and sequences the caller asked for that the archive does not have."""
    rows = []
    present = sorted(p.name for p in root.iterdir() if (p / "sequences").is_dir())
    for participant in participants or []:
        if participant not in present:
            rows.append(_row(participant, "*", "failed",
                             error=f"participant {participant!r} not found under {root} "
                                   f"(participants there: {', '.join(present) or 'none'})"))
    seen = {raw.sequence for raw in found}
    for sequence in sequences or []:
        if sequence not in seen:
            rows.append(_row("*", sequence, "failed",
                             error=f"sequence {sequence!r} not found under {root}"
                                   + (f" for participants {', '.join(participants)}" if participants else "")))
    return rows


@flow(name="process-archive", flow_run_name=_run_name, log_prints=True)
def process_archive(
    archive_root: str,
    work_root: str,
    participants: list[str] | None = None,
    sequences: list[str] | None = None,
    config: PipelineConfig = PipelineConfig(),
    stages: list[str] | None = None,
    max_concurrent: int = 1,
    sequence_deployment: str | None = None,
    optimize_deployment: str | None = None,
    rerun_finished: bool = False,
    drop_arrays: bool = False,
) -> list[dict]:
    """Process every sequence under ``archive_root`` (``<PID>/sequences/<SEQ>``) into ``work_root``.

    Returns the summary rows (also the ``archive-summary`` artifact).

    Args:
        archive_root: the folder holding `<PID>/sequences/<SEQ>` raw captures.
        work_root: where outputs go (a path or fsspec URL every worker reaches): `<work_root>/<PID>/<SEQ>/`.
        participants: only these participant IDs; default: all.
        sequences: only these sequence names; default: all.
        config: every stage's settings, the same for each sequence (the CLI's `--config` file format).
        stages: run only these stages, in pipeline order; default: all of ingest, calibrate, matte, depth,
            optimize, export, evaluate.
        max_concurrent: sequences processed at the same time.
        sequence_deployment: run each sequence as a run of this deployment (e.g.
            `process-sequence/process-sequence`) that any worker of its pool picks up, instead of a subflow
            in this process.
        optimize_deployment: train through this deployment (e.g. `optimize-sequence/optimize-sequence`) on a
            gpu worker.
        rerun_finished: also run sequences whose last run finished with these stages and settings.
        drop_arrays: once a sequence's export has succeeded, delete its frames, alpha and depth arrays
            (calibration, model, exports and reports stay; the sequence still counts as finished).
    """
    logger = get_run_logger()
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
    wanted = check_stages(stages)
    root = Path(archive_root).resolve()
    found, problems = list_archive(root, participants, sequences)  # a missing root raises: nothing to do
    parameters = {"config": config, "stages": wanted, "optimize_deployment": optimize_deployment}

    rows = _unknown_filters(root, participants, sequences, found)
    for row in rows:
        logger.error("%s", row["error"])
    for problem in problems:
        logger.error("unreadable capture: %s", problem)
        rows.append(_row(*_location(problem, root), "failed", error=problem))

    todo = []
    for raw in found:
        work = SequenceWorkDir.for_sequence(work_root, raw.participant, raw.sequence)
        done = None if rerun_finished else finished_sequence(work, wanted, config)
        if done is not None:  # one debug line each (not sent at the default level), one info line for all
            logger.debug("%s/%s finished earlier (%s); skipped", raw.participant, raw.sequence, done["finished_at"])
            rows.append(_row(raw.participant, raw.sequence, "skipped", 0.0, psnr=done.get("psnr")))
        else:
            todo.append(raw)
    skipped = [f"{row['participant']}/{row['sequence']}" for row in rows if row["status"] == "skipped"]
    if skipped:
        logger.info("finished earlier, skipped: %s", ", ".join(skipped[:20])
                    + (f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""))
    logger.info("%d sequence(s) to run, %d finished earlier, %d unreadable or not found", len(todo),
                sum(row["status"] == "skipped" for row in rows), sum(row["status"] == "failed" for row in rows))

    # Sequences train in worker threads, where no signal handler can be installed: a cancel (SIGTERM) or Ctrl-C
    # reaching this main thread asks their training to checkpoint and stop, then goes on to Prefect's handler.
    with forward_stop_signals(), ThreadPoolTaskRunner(max_workers=max_concurrent) as runner:
        futures = [runner.submit(run_sequence, {
            "participant": raw.participant, "sequence": raw.sequence, "raw_sequence_dir": str(raw.sequence_dir),
            "work_root": work_root, "parameters": parameters, "sequence_deployment": sequence_deployment})
            for raw in todo]
        for future in as_completed(futures):
            row = future.result()
            log = logger.error if row["status"] == "failed" else logger.info
            log("%s/%s %s in %.1f s%s", row["participant"], row["sequence"], row["status"], row["seconds"],
                f": {row['error']}" if row["error"] else "")
            rows.append(row)

    rows = [_storage(work_root, row, drop_arrays) for row in rows]
    rows.sort(key=lambda row: (row["participant"], row["sequence"]))
    publish_archive_summary(rows, str(root))
    failures = [row for row in rows if row["status"] == "failed"]
    if failures:
        listed = "; ".join(f"{row['participant']}/{row['sequence']}: {row['error']}" for row in failures)
        raise ArchiveFailures(f"{len(failures)} of {len(rows)} sequence(s) failed: {listed}", rows)
    return rows
