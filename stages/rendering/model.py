"""The trained model and the store's cameras, as export and evaluate need them.

Export and evaluate only read the optimize stage's outputs through ``stages.optimize.stage.load_trained_model``
(model, config, step, train/hold-out cameras, timesteps, warnings), so the checkpoint format stays the trainer's
business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stages.core.errors import StageOrderError
from stages.core.bookkeeping import PRODUCED_BY
from stages.core.devices import resolve_device, torch_threads  # noqa: F401 - re-exported for export/evaluate
from stages.geometry.holdout import check_model_protocol
from storage import CaptureStore, SequenceWorkDir


def load_model(work: SequenceWorkDir, device: torch.device, stage: str, eval_substeps: int | None = None) -> Any:
    """``stages.optimize.stage.load_trained_model`` (a ``TrainedModel``), or a StageOrderError naming the optimize command.

    ``eval_substeps``: march renders at the training step / this (None: as the model was trained).
    """
    try:
        from stages.optimize.stage import load_trained_model
    except ImportError as error:  # the trainer is not part of this installation
        raise StageOrderError(f"{work.uri}: the {stage} stage needs a trained model, and the optimize stage is not "
                              f"available here ({error}); run `{PRODUCED_BY['optimize']}`") from None
    return load_trained_model(work.uri, device=str(device), eval_substeps=eval_substeps)


@dataclass(frozen=True)
class StoreCameras:
    """The calibrated cameras at the stored frame size."""

    serials: list[str]
    intrinsics: dict[str, np.ndarray]
    world_2_cam: dict[str, np.ndarray]
    width: int
    height: int


def store_cameras(store: CaptureStore, stage: str) -> StoreCameras:
    intrinsics, world_2_cam = store.intrinsics, store.world_2_cam
    if intrinsics is None or world_2_cam is None:
        raise StageOrderError(f"{store.uri}: the {stage} stage needs every camera's K and world_2_cam, and the "
                              f"store has none: run `{PRODUCED_BY['calibrate']}`")
    return StoreCameras(list(store.cameras), intrinsics, world_2_cam, store.width, store.height)


def check_model_fits(trained: Any, store: CaptureStore, stage: str) -> None:
    """The model must have been trained on this store: same timesteps, hold-out cameras that exist."""
    if trained.n_timesteps != store.n_frames:
        raise StageOrderError(f"{store.uri}: the trained model has {trained.n_timesteps} timesteps but the store has "
                              f"{store.n_frames} frames (re-ingested since training?); run "
                              f"`{PRODUCED_BY['optimize']}` again")
    unknown = [s for s in trained.holdout_cameras if s not in store.cameras]
    if unknown:
        raise StageOrderError(f"{store.uri}: the model's hold-out cameras {', '.join(unknown)} are not in the store; "
                              f"run `{PRODUCED_BY['optimize']}` again")


def load_checked_model(work: SequenceWorkDir, store: CaptureStore, device: torch.device, stage: str,
                       eval_substeps: int | None, warnings: list[str]) -> Any:
    """The trained model, refused unless it fits the store's cameras and was trained under its hold-out set.

    Its load warnings (a checkpoint from before checksums: loaded, not verified) join ``warnings``.
    """
    trained = load_model(work, device, stage, eval_substeps)
    check_model_fits(trained, store, stage)
    check_model_protocol(store, trained.holdout_cameras, stage, PRODUCED_BY["optimize"])
    warnings.extend(trained.warnings)
    return trained


def render_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))
