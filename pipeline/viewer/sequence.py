"""What a viewer shows of one sequence: the trained model (loaded as export loads it), the rig, the scores.

The model comes through ``stages.rendering.model.load_checked_model``, the loader export and evaluate use: the
newest checkpoint, checksum-verified, weights only, refused unless it fits the store's cameras and hold-out set.
An older checkpoint (``--checkpoint N``) goes through the same loader from a private folder that holds only that
file, so it is verified the same way and the checkpoint format stays the trainer's business.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.bookkeeping import open_store_for
from stages.core.errors import PipelineError, StageOrderError
from stages.rendering.model import StoreCameras, load_checked_model, resolve_device, store_cameras
from storage import CaptureStore, SequenceWorkDir

STAGE = "view"
CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")
# Images drawn while the view moves are previews, replaced by the full-size render once it rests: they march at
# twice the training step, half the samples of a ray, which a drag on a CPU needs to keep up with the hand.
COARSE_STEP_FACTOR = 2.0


@dataclass
class HoldoutScores:
    """The hold-out PSNR/SSIM a report states, where from, and for which model step."""

    psnr: float
    ssim: float | None
    source: str
    step: int | None


@dataclass
class ViewerSequence:
    """Everything the pages of one viewer share: one model for every tab."""

    work: SequenceWorkDir
    store: CaptureStore
    cameras: StoreCameras
    trained: Any  # a stages.rendering TrainedModel
    coarse: Any  # the same weights marching at COARSE_STEP_FACTOR x the training step: the images while moving
    device: torch.device
    fps: float
    box: np.ndarray  # (2, 3) scene box corners, metres
    scores: HoldoutScores | None
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.work.participant}/{self.work.sequence}"

    @property
    def n_timesteps(self) -> int:
        return int(self.trained.n_timesteps)

    @property
    def box_centre(self) -> np.ndarray:
        return self.box.mean(axis=0)

    def is_holdout(self, serial: str) -> bool:
        return serial in self.trained.holdout_cameras


def checkpoint_steps(work: SequenceWorkDir) -> list[int]:
    found = (CHECKPOINT_NAME.match(name) for name in work.listdir("nersemble", "checkpoints"))
    return sorted(int(m.group(1)) for m in found if m)


def open_sequence(sequence_work_dir: str, device: str = "auto", checkpoint: int | None = None) -> ViewerSequence:
    """Load a trained sequence for viewing; every refusal is one line naming the command that fixes it."""
    work = SequenceWorkDir(sequence_work_dir)
    store = open_store_for(work, STAGE, mode="r")
    cameras = store_cameras(store, STAGE)
    target = resolve_device(device, STAGE)
    steps = checkpoint_steps(work)
    if not steps:
        raise StageOrderError(f"{work.uri}: this sequence was never optimized (no nersemble/checkpoints/step-*.pt); "
                              f"run `nersemble-pipeline optimize {work.uri}` first")
    if checkpoint is not None and checkpoint not in steps:
        raise PipelineError(f"{work.uri}: no checkpoint for step {checkpoint} (kept: {', '.join(map(str, steps))}); "
                            f"run `nersemble-pipeline view {work.uri} --checkpoint {steps[-1]}`")
    step = None if checkpoint in (None, steps[-1]) else checkpoint
    warnings: list[str] = []
    trained = _load(work, store, target, step, None, warnings)
    coarse = coarse_copy(_load(work, store, target, step, 1, []))
    box = trained.model.scene_box.detach().cpu().double().numpy() / float(trained.config.scene.world_scale)
    return ViewerSequence(work=work, store=store, cameras=cameras, trained=trained, coarse=coarse, device=target,
                          fps=store.fps, box=box, scores=holdout_scores(work), warnings=warnings)


def coarse_copy(trained: Any) -> Any:
    """The model that draws while the view moves: its own copy of the weights, marching COARSE_STEP_FACTOR times
    the training step."""
    sampler = trained.config.sampler
    config = trained.config.with_overrides({"sampler.step_size": sampler.step_size * COARSE_STEP_FACTOR,
                                            "sampler.eval_substeps": 1})
    trained.model.config = config
    return replace(trained, config=config)


def _load(work: SequenceWorkDir, store: CaptureStore, device: torch.device, step: int | None,
          eval_substeps: int | None, warnings: list[str]) -> Any:
    """The newest checkpoint, or ``step``'s through the same loader: a private work folder holding only that file."""
    if step is None:
        return load_checked_model(work, store, device, STAGE, eval_substeps, warnings)
    name = f"step-{step:07d}.pt"
    data = work.read_bytes(f"nersemble/checkpoints/{name}")
    folder = Path(tempfile.mkdtemp(prefix="nersemble-view-"))
    try:
        private = folder / work.participant / work.sequence
        (private / "nersemble" / "checkpoints").mkdir(parents=True)
        (private / "nersemble" / "checkpoints" / name).write_bytes(data or b"")
        return load_checked_model(SequenceWorkDir(str(private)), store, device, STAGE, eval_substeps, warnings)
    except PipelineError as error:
        raise PipelineError(str(error).replace(str(private), work.uri)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def holdout_scores(work: SequenceWorkDir) -> HoldoutScores | None:
    """Hold-out PSNR/SSIM from reports/evaluate.json, else export/metrics.json; None when neither has them."""
    try:
        report = work.read_report("evaluate") or {}
        if report.get("psnr") is not None:
            return HoldoutScores(float(report["psnr"]), _maybe_float(report.get("ssim")), "reports/evaluate.json",
                                 report.get("model_step"))
        metrics = work.read_json("export/metrics.json") or {}
    except (ValueError, OSError):  # a damaged report is not worth refusing to view a model
        return None
    results = metrics.get("results") or {}
    for name in ("synthetic", "matte", *results):  # the exact images first, as evaluate's headline
        overall = (results.get(name) or {}).get("overall") or {}
        if overall.get("psnr") is not None:
            return HoldoutScores(float(overall["psnr"]), _maybe_float(overall.get("ssim")),
                                 f"export/metrics.json ({name})", metrics.get("model_step"))
    return None


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)
