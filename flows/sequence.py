"""The per-sequence flow: one flow run per captured sequence, stages in DAG order.

Completed stages are skipped through the store's records, so re-running a crashed flow resumes where it
stopped. Stages land here as they are implemented.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.artifacts import publish_stage_report
from flows.tasks import calibrate_task, depth_task, ingest_task, matte_task
from pipeline.config import CalibrateConfig, DepthConfig, IngestConfig, MatteConfig
from storage import SequenceWorkDir

STAGES = ("ingest", "calibrate", "matte", "depth")


def _run_name() -> str:
    """``<PID>/<SEQ>`` from the raw sequence path, so the UI's run list reads like the archive."""
    path = Path(flow_run.parameters["raw_sequence_dir"])
    return f"{path.parent.parent.name}/{path.name}"


@flow(name="process-sequence", flow_run_name=_run_name, log_prints=True)
def process_sequence(
    raw_sequence_dir: str,
    work_root: str,
    ingest: IngestConfig = IngestConfig(),
    calibrate: CalibrateConfig = CalibrateConfig(),
    matte: MatteConfig = MatteConfig(),
    depth: DepthConfig = DepthConfig(),
    stages: list[str] | None = None,
) -> dict[str, dict]:
    """Run the pipeline on ``<archive>/<PID>/sequences/<SEQ>``; returns each stage's report."""
    logger = get_run_logger()
    wanted = stages or list(STAGES)
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; available: {', '.join(STAGES)}")
    path = Path(raw_sequence_dir)
    participant, sequence = path.parent.parent.name, path.name
    work = SequenceWorkDir.for_sequence(work_root, participant, sequence)
    reports: dict[str, dict] = {}

    def record(stage: str, report: dict) -> None:
        """Keep the report and publish it now, so the UI shows each stage while later ones run."""
        logger.info("%s %s", stage, report["status"])
        publish_stage_report(stage, participant, sequence, report)
        reports[stage] = report

    if "ingest" in wanted:
        record("ingest", ingest_task(str(path), work_root, ingest))
    if "calibrate" in wanted:
        record("calibrate", calibrate_task(work.uri, calibrate))
    if "matte" in wanted:
        record("matte", matte_task(work.uri, matte))
    if "depth" in wanted:
        record("depth", depth_task(work.uri, depth))
    return reports
