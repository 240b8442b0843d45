"""The trained model and the store's cameras, as export and evaluate need them.

Export, evaluate and the viewer read the optimize stage's outputs only through :func:`load_trained_model` (model,
config, step, train/hold-out cameras, timesteps, warnings). It lives here, in the shared room below the stages,
on top of the checkpoint format (``stages.nersemble.checkpoint``) and the checkpoint folder layout
(``checkpoints``), so nothing that reads a model imports the optimize stage; ``stages.optimize.stage`` imports it
back under its documented name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from stages.core.bookkeeping import PRODUCED_BY
from stages.core.devices import resolve_device, torch_threads  # noqa: F401 - re-exported for export/evaluate
from stages.core.errors import StageOrderError
from stages.geometry.holdout import check_model_protocol
from stages.nersemble.checkpoint import model_from_checkpoint
from stages.nersemble.config import NeRSembleConfig
from stages.nersemble.model import NeRSembleModel
from stages.rendering.backend import resolve_backend
from stages.rendering.checkpoints import CHECKPOINTS, latest_checkpoint
from storage import CaptureStore, SequenceWorkDir


@dataclass
class TrainedModel:
    """A trained model ready to render, and what it was trained on."""

    model: NeRSembleModel
    config: NeRSembleConfig
    step: int
    train_cameras: list[str]
    holdout_cameras: list[str]
    n_timesteps: int
    warnings: list[str] = field(default_factory=list)  # e.g. a checkpoint from before checksums, not verified


def load_trained_model(sequence_work_dir: str | os.PathLike[str], device: str = "auto", encoding: str = "auto",
                       eval_substeps: int | None = None) -> TrainedModel:
    """The newest trained model of a sequence, on ``device``, in eval mode.

    ``eval_substeps`` overrides the render step the model was trained with (None keeps it).
    """
    work = SequenceWorkDir(sequence_work_dir)
    target = resolve_device(device, "render")
    warnings: list[str] = []
    checkpoint = latest_checkpoint(work, "cpu", warnings=warnings)
    if checkpoint is None:
        raise StageOrderError(f"{work.uri}: no trained model in nersemble/{CHECKPOINTS}/: run "
                              f"`{PRODUCED_BY['optimize']}` first")
    model = model_from_checkpoint(checkpoint, target, resolve_backend(encoding, target), eval_substeps)
    model.allow_kernel_fallback(encoding == "auto")  # a named backend fails loudly; auto falls back
    return TrainedModel(model=model, config=model.config, step=int(checkpoint["step"]),
                        train_cameras=list(checkpoint["train_cameras"]),
                        holdout_cameras=list(checkpoint["holdout_cameras"]), n_timesteps=model.n_timesteps,
                        warnings=warnings)


def load_model(work: SequenceWorkDir, device: torch.device, stage: str,
               eval_substeps: int | None = None) -> TrainedModel:
    """:func:`load_trained_model` on ``device``: the seam the export tests stand a model in at.

    ``eval_substeps``: march renders at the training step / this (None: as the model was trained). ``stage`` named
    the stage in the error for an installation without the optimize stage, which cannot happen since the loader
    lives here; it stays so that callers and the tests' stand-ins keep one signature.
    """
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


def check_model_fits(trained: TrainedModel, store: CaptureStore, stage: str) -> None:
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
                       eval_substeps: int | None, warnings: list[str]) -> TrainedModel:
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
