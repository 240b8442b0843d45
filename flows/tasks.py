"""Prefect tasks around the stages. They pass paths, configs and reports, never frames.

Retries are for transient I/O only (a network file system hiccup, a busy object store); bad input fails
at once, because retrying it would only repeat the same clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from stages.calibrate.config import CalibrateConfig
from stages.depth.config import DepthConfig
from stages.evaluate.config import EvaluateConfig
from stages.export.config import ExportConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig
from stages.core.errors import PipelineError


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


# The store's stage records are the cache: Prefect's own input caching is off. A retry re-enters the stage,
# which skips what it finished (and training resumes from its last checkpoint).
stage_task = task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5,
                  retry_condition_fn=is_transient)


@stage_task(name="ingest")
def ingest_task(raw_sequence_dir: str, work_root: str, config: IngestConfig) -> dict:
    from stages.ingest.stage import ingest_sequence

    return ingest_sequence(raw_sequence_dir, work_root, config)


@stage_task(name="calibrate")
def calibrate_task(sequence_work_dir: str, config: CalibrateConfig) -> dict:
    from stages.calibrate.stage import calibrate_sequence

    return calibrate_sequence(sequence_work_dir, config)


@stage_task(name="matte")
def matte_task(sequence_work_dir: str, config: MatteConfig) -> dict:
    from stages.matte.stage import matte_sequence

    return matte_sequence(sequence_work_dir, config)


@stage_task(name="depth")
def depth_task(sequence_work_dir: str, config: DepthConfig) -> dict:
    from stages.depth.stage import depth_sequence

    return depth_sequence(sequence_work_dir, config)


@stage_task(name="optimize")
def optimize_task(sequence_work_dir: str, config: OptimizeConfig,
                  progress: Callable[[Any], None] | None = None) -> dict:
    """Train NeRSemble; ``progress`` receives the trainer's ``TrainingProgress`` every few steps."""
    from stages.optimize.stage import optimize_sequence

    return optimize_sequence(sequence_work_dir, config, progress=progress)


@stage_task(name="export")
def export_task(sequence_work_dir: str, config: ExportConfig) -> dict:
    from stages.export.stage import export_sequence

    return export_sequence(sequence_work_dir, config)


@stage_task(name="evaluate")
def evaluate_task(sequence_work_dir: str, config: EvaluateConfig) -> dict:
    from stages.evaluate.stage import evaluate_sequence

    return evaluate_sequence(sequence_work_dir, config)
