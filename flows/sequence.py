"""The per-sequence flow: one flow run per captured sequence, stages in DAG order.

ingest -> calibrate -> matte -> depth -> optimize -> export -> evaluate. Each stage checks its own record in
the capture store and returns a ``skipped`` report when its outputs already match its config and inputs, so a
re-run (after a crash, a kill or a fix) resumes where the last one stopped. Optimize runs as its own flow,
in-process or as a deployment run on a GPU work pool.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.artifacts import SequenceOverview
from flows.figures import stage_figures, stage_line
from flows.ledger import record_finished_sequence
from flows.optimize import optimize_sequence
from flows.tasks import calibrate_task, depth_task, evaluate_task, export_task, ingest_task, matte_task
from stages.config import PipelineConfig
from stages.core.errors import PipelineError
from stages.depth.config import DepthConfig
from stages.optimize.config import OptimizeConfig
from stages.table import STAGE_NAMES
from storage import SequenceWorkDir

STAGES = STAGE_NAMES


class UnknownStageError(PipelineError, ValueError):
    """A stage name that is not one of STAGES."""


def check_stages(stages: list[str] | None) -> list[str]:
    """The stages to run, in pipeline order; unknown names are an error that lists the known ones."""
    wanted = list(stages) if stages else list(STAGES)
    unknown = sorted(set(wanted) - set(STAGES))
    if unknown:
        raise UnknownStageError(f"unknown stage(s) {', '.join(unknown)}; available: {', '.join(STAGES)}")
    return [stage for stage in STAGES if stage in wanted]


def depth_config(config: PipelineConfig) -> DepthConfig:
    """Depth's settings, holding out what optimize will hold out when depth's own request is unset: one hold-out
    set per sequence, so the depth maps never use a camera the model is scored on."""
    if config.depth.holdout is not None:
        return config.depth
    return config.depth.model_copy(update={"holdout": config.optimize.holdout_request()})


def _run_name() -> str:
    """``<PID>/<SEQ>`` from the raw sequence path, so the UI's run list reads like the archive."""
    path = Path(flow_run.parameters["raw_sequence_dir"])
    return f"{path.parent.parent.name}/{path.name}"


def optimize_via_deployment(deployment: str, work: SequenceWorkDir, config: OptimizeConfig) -> dict:
    """Run ``optimize-sequence`` as a deployment run (a GPU worker picks it up) and wait for it.

    The work folder must be shared storage both machines reach; the report is read back from it.
    """
    from prefect.deployments import run_deployment

    parameters = {"sequence_work_dir": work.uri, "config": config.model_dump(mode="json")}
    run = run_deployment(deployment, parameters=parameters, timeout=None, poll_interval=5)
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        message = run.state.message if run.state else ""
        raise PipelineError(f"optimize deployment run {run.name} ({deployment}) ended {state}: {message}")
    return work.read_report("optimize") or {"status": "completed", "flow_run": str(run.id)}


@flow(name="process-sequence", flow_run_name=_run_name, log_prints=True)
def process_sequence(
    raw_sequence_dir: str,
    work_root: str,
    config: PipelineConfig = PipelineConfig(),
    stages: list[str] | None = None,
    optimize_deployment: str | None = None,
) -> dict[str, dict]:
    """Run the pipeline on ``<archive>/<PID>/sequences/<SEQ>``; returns each stage's report.

    Args:
        raw_sequence_dir: the raw capture's sequence folder, `<archive>/<PID>/sequences/<SEQ>`.
        work_root: where outputs go (a path or fsspec URL): `<work_root>/<PID>/<SEQ>/`.
        config: every stage's settings (the CLI's `--config` file format); unset fields keep their defaults.
        stages: run only these stages, in pipeline order (each still needs its upstream records); default: all
            of ingest, calibrate, matte, depth, optimize, export, evaluate.
        optimize_deployment: train through this deployment (e.g. `optimize-sequence/optimize-sequence`) on
            whichever worker serves it, instead of in this process.
    """
    logger = get_run_logger()
    started = time.monotonic()
    wanted = check_stages(stages)
    path = Path(raw_sequence_dir)
    participant, sequence = path.parent.parent.name, path.name
    work = SequenceWorkDir.for_sequence(work_root, participant, sequence)
    reports: dict[str, dict] = {}
    overview = SequenceOverview(participant, sequence, wanted, work)

    def record(stage: str, report: dict, logged: bool = False) -> None:
        """Keep the report, log its key figures (unless a subflow in this process ``logged`` them already), and
        show it in the overview while later stages run.

        The stage's own artifacts were published by its task run (optimize: by the optimize flow's task).
        """
        if not logged:
            logger.info("%s", stage_line(stage, report))
        overview.stage(stage, str(report.get("status")), stage_figures(stage, report))
        reports[stage] = report

    try:
        _run_stages(wanted, path, work_root, work, config, optimize_deployment, record)
    except BaseException as error:
        failed = next((stage for stage in wanted if stage not in reports), None)
        if failed is not None:
            overview.stage(failed, "failed", f"{type(error).__name__}: {error}")
        overview.finish(f"failed after {time.monotonic() - started:.1f} s")
        raise
    seconds = time.monotonic() - started
    record_finished_sequence(work, wanted, config, reports, seconds)
    overview.finish(f"finished in {seconds:.1f} s")
    return reports


def _run_stages(wanted: list[str], path: Path, work_root: str, work: SequenceWorkDir, config: PipelineConfig,
                optimize_deployment: str | None, record) -> None:  # noqa: ANN001 - record(stage, report)
    """The DAG: each wanted stage in pipeline order, its report handed to ``record``."""
    logger = get_run_logger()
    if "ingest" in wanted:
        record("ingest", ingest_task(str(path), work_root, config.ingest))
    if "calibrate" in wanted:
        record("calibrate", calibrate_task(work.uri, config.calibrate))
    if "matte" in wanted:
        record("matte", matte_task(work.uri, config.matte))
    if "depth" in wanted:
        record("depth", depth_task(work.uri, depth_config(config)))
    if "optimize" in wanted:
        if optimize_deployment:
            logger.info("optimize runs as a deployment run of %s", optimize_deployment)
            record("optimize", optimize_via_deployment(optimize_deployment, work, config.optimize))
        else:  # a subflow in this process: it logs its own line (and its console is this one)
            record("optimize", optimize_sequence(work.uri, config.optimize), logged=True)
    if "export" in wanted:
        record("export", export_task(work.uri, config.export))
    if "evaluate" in wanted:
        record("evaluate", evaluate_task(work.uri, config.evaluate))
