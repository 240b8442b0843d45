"""Prefect tasks around the stages. They pass paths, configs and reports, never frames.

Task runs are named ``<stage> <PID>/<SEQ>`` (``matte 001/EXP-1-head``), and each publishes its stage's
artifacts (report, pictures, per-camera table, links) before it returns, so they sit on its task run.

Retries are for transient I/O only (a network file system hiccup, a busy object store); bad input fails
at once, because retrying it would only repeat the same clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.runtime import task_run
from prefect.states import State

from flows.artifacts import publish_stage

from stages.calibrate.config import CalibrateConfig
from stages.depth.config import DepthConfig
from stages.evaluate.config import EvaluateConfig
from stages.export.config import ExportConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig
from stages.core.errors import PipelineError
from stages.table import stage as stage_row
from storage import SequenceWorkDir


def is_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry OSErrors that are not about missing files; never retry bad input."""
    try:
        state.result()
    except (PipelineError, FileNotFoundError, FileExistsError, PermissionError):
        return False
    except (OSError, TimeoutError):
        return True
    except Exception:
        return False
    return False


def sequence_label(location: str) -> str:
    """``<PID>/<SEQ>`` of a raw sequence folder (``.../<PID>/sequences/<SEQ>``) or a work folder (``.../<PID>/<SEQ>``)."""
    path = Path(str(location).rstrip("/"))
    if path.parent.name == "sequences":
        return f"{path.parent.parent.name}/{path.name}"
    work = SequenceWorkDir(location)
    return f"{work.participant}/{work.sequence}"


def _task_run_name(stage: str) -> Callable[[], str]:
    def name() -> str:
        parameters = task_run.parameters
        location = parameters.get("sequence_work_dir") or parameters.get("raw_sequence_dir") or ""
        return f"{stage} {sequence_label(location)}"

    return name


def stage_task(stage: str) -> Callable[[Callable[..., dict]], Task]:
    """The task decorator of one stage of the stage table: named after it, its runs after stage and sequence.

    The store's stage records are the cache: Prefect's own input caching is off. A retry re-enters the stage,
    which skips what it finished (and training resumes from its last checkpoint).
    """
    name = stage_row(stage).name  # a KeyError names the known stages
    return task(name=name, task_run_name=_task_run_name(name), cache_policy=NO_CACHE, retries=2,
                retry_delay_seconds=[5, 30], retry_jitter_factor=0.5, retry_condition_fn=is_transient)


def _published(stage: str, sequence_work_dir: str, report: dict) -> dict:
    publish_stage(stage, SequenceWorkDir(sequence_work_dir), report)
    return report


@stage_task("ingest")
def ingest_task(raw_sequence_dir: str, work_root: str, config: IngestConfig) -> dict:
    from stages.ingest.stage import ingest_sequence

    path = Path(raw_sequence_dir)
    work = SequenceWorkDir.for_sequence(work_root, path.parent.parent.name, path.name)
    return _published("ingest", work.uri, ingest_sequence(raw_sequence_dir, work_root, config))


@stage_task("calibrate")
def calibrate_task(sequence_work_dir: str, config: CalibrateConfig) -> dict:
    from stages.calibrate.stage import calibrate_sequence

    return _published("calibrate", sequence_work_dir, calibrate_sequence(sequence_work_dir, config))


@stage_task("matte")
def matte_task(sequence_work_dir: str, config: MatteConfig) -> dict:
    from stages.matte.stage import matte_sequence

    return _published("matte", sequence_work_dir, matte_sequence(sequence_work_dir, config))


@stage_task("depth")
def depth_task(sequence_work_dir: str, config: DepthConfig) -> dict:
    from stages.depth.stage import depth_sequence

    return _published("depth", sequence_work_dir, depth_sequence(sequence_work_dir, config))


@stage_task("optimize")
def optimize_task(sequence_work_dir: str, config: OptimizeConfig,
                  progress: Callable[[Any], None] | None = None) -> dict:
    """Train NeRSemble; ``progress`` receives the trainer's ``TrainingProgress`` every few steps."""
    from stages.optimize.stage import optimize_sequence

    return _published("optimize", sequence_work_dir, optimize_sequence(sequence_work_dir, config, progress=progress))


@stage_task("export")
def export_task(sequence_work_dir: str, config: ExportConfig) -> dict:
    from stages.export.stage import export_sequence

    return _published("export", sequence_work_dir, export_sequence(sequence_work_dir, config))


@stage_task("evaluate")
def evaluate_task(sequence_work_dir: str, config: EvaluateConfig) -> dict:
    from stages.evaluate.stage import evaluate_sequence

    return _published("evaluate", sequence_work_dir, evaluate_sequence(sequence_work_dir, config))
