"""Optimize: train NeRSemble on one sequence's capture store; writes ``nersemble/`` and ``reports/optimize.json``.

The store feeds the trainer through :class:`StoreImageSource`, one (camera, timestep) chunk at a time, so a
long sequence never sits in memory. Checkpoints land in ``nersemble/checkpoints/`` every
``checkpoint_every`` steps and every ``checkpoint_every_s`` seconds; a killed run picks up its newest
checkpoint when it is started again with the same config and the same upstream results (anything else starts
over). The two newest checkpoints are kept: each carries a content hash, and a resume skips a damaged newest
one for the one before it (with a warning in the report), while export and evaluate refuse it by name. A
checkpoint from before content hashes is used as it is, with a "not verified" warning in the report.
SIGINT and SIGTERM finish the step in flight, write a checkpoint and the report (``stopped_by``
"interrupted"), then raise :class:`TrainingInterrupted`. The record is written last, after the final
checkpoint, so downstream stages only ever see a finished model.
"""

from __future__ import annotations

import cv2  # noqa: F401 - before anything that may import pycolmap (their zlib builds clash)

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.optimize.config import OptimizeConfig
from stages.core.errors import PipelineError, StageOrderError
from stages.core.bookkeeping import PRODUCED_BY
from stages.core.skeleton import Decision, StageRun, run_stage
from stages.core.status import Status
from stages.geometry.views import make_views
from stages.geometry.hull import visual_hull
from stages.geometry.holdout import (HoldoutSet, check_depth_protocol, choose_holdout, digest_part, record_holdout,
                                     resolve_holdout)
from stages.core.devices import resolve_device, torch_threads
from stages.core.interrupts import StopRequest, TrainingInterrupted, stop_on_signals
from stages.nersemble import NeRSembleConfig, NeRSembleModel, preset, scene_box_from_cameras
from stages.nersemble.checkpoint import save_checkpoint
from stages.nersemble.image_cache import TrainImage, TrainView
from stages.nersemble.trainer import ProgressCallback, Trainer, TrainingProgress
from stages.optimize.curves import training_curves_png
from stages.rendering.backend import resolve_backend
from stages.rendering.checkpoints import checkpoint_path, checkpoint_steps, latest_checkpoint
from stages.rendering.model import load_trained_model  # noqa: F401 - public here: docs/stages.md names it
from storage import CaptureStore, SequenceWorkDir

STAGE = "optimize"
VERSION = "1"
HULL_TIMESTEPS = 6  # frames whose matte hulls bound the scene box and the occupancy grid
HULL_PADDING_M = 0.03  # margin around the hull: hair and matte edges the hull may have shaved
KEEP_CHECKPOINTS = 2  # the newest and the one before it: a damaged newest one never costs the whole run


class StoreImageSource:
    """The training cameras of a capture store, read one (camera, timestep) chunk at a time."""

    def __init__(self, store: CaptureStore, serials: list[str], use_depth: bool) -> None:
        self.store, self.serials, self.use_depth = store, serials, use_depth
        self.indices = [store.camera_index(s) for s in serials]
        K, w2c = store.intrinsics, store.world_2_cam
        self.views = [TrainView(K[s], w2c[s], store.width, store.height) for s in serials]
        self.n_timesteps = store.n_frames

    def load(self, view: int, timestep: int) -> TrainImage:
        camera = self.indices[view]
        return TrainImage(rgb=self.store.read_frame(camera, timestep), alpha=self.store.read_alpha(camera, timestep),
                          depth=self.store.read_depth(camera, timestep) if self.use_depth else None)


# --- choices made before anything is written --------------------------------------------------------------


def model_config(config: OptimizeConfig) -> NeRSembleConfig:
    """The preset with the user's overrides, steps and seed; a bad key names itself."""
    try:
        cfg = preset(config.preset).with_overrides(config.overrides)
    except (KeyError, TypeError, ValueError) as error:
        raise PipelineError(f"optimize --override: {error}") from None
    extra = {}
    if config.steps is not None:
        extra["train.steps"] = config.steps
    if config.seed is not None:
        extra["train.seed"] = config.seed
    if config.checkpoint_every is not None:
        extra["train.checkpoint_every"] = config.checkpoint_every
    return cfg.with_overrides(extra) if extra else cfg


def split_cameras(cameras: list[str], holdout: list[str] | None,
                  world_2_cam: dict[str, np.ndarray] | None = None) -> tuple[list[str], list[str]]:
    """(train, hold-out) serials for a hold-out request (``stages.geometry.holdout``), without a store."""
    held = choose_holdout(cameras, world_2_cam, holdout, STAGE)
    return held.train(cameras), list(held.cameras)


def plan_holdout(store: CaptureStore, config: OptimizeConfig) -> HoldoutSet:
    """The sequence's hold-out set for this run, refused when the store's depth maps were made with another."""
    holdout = resolve_holdout(store, config.holdout_request(), STAGE)
    check_depth_protocol(store, holdout, STAGE, PRODUCED_BY["depth"])
    return holdout


def matte_hull_points(store: CaptureStore, serials: list[str]) -> np.ndarray | None:
    """Voxel centres (metres) of the mattes' visual hulls at ``HULL_TIMESTEPS`` frames, padded by their voxel.

    None when a hull comes out empty (mattes that disagree with the calibration): then nothing is derived
    from the mattes.
    """
    views = make_views(serials, store.intrinsics, store.world_2_cam, store.width, store.height,
                       torch.device("cpu"))
    indices = [store.camera_index(s) for s in serials]
    clouds = []
    for t in np.unique(np.linspace(0, store.n_frames - 1, HULL_TIMESTEPS).round().astype(int)):
        masks = np.stack([store.read_alpha(i, int(t)) >= 128 for i in indices])
        hull = visual_hull(views, masks, resolution=64, misses=1, dilation_px=2.0)
        if hull.empty:
            return None
        clouds.append(hull.points.numpy())
    return np.concatenate(clouds)


def scene_box(store: CaptureStore, serials: list[str], cfg: NeRSembleConfig, hull: np.ndarray | None,
              given_m: tuple | None = None) -> tuple[torch.Tensor, str]:
    """The box the field lives in (model units): the given one, else the mattes' visual hull, padded, else a box
    at the rig's focus.

    A tight box is the cheapest speed-up there is on a CPU: every ray marches only through it.
    """
    if given_m is not None:  # validated by OptimizeConfig
        box = np.asarray(given_m, dtype=np.float64)
        return torch.as_tensor(box * cfg.scene.world_scale, dtype=torch.float32), "config"
    if hull is None:
        w2c = store.world_2_cam
        box = scene_box_from_cameras([w2c[s] for s in serials], cfg.scene.box_size_m, cfg.scene.world_scale)
        return box, "cameras"
    box = np.stack([hull.min(0) - HULL_PADDING_M, hull.max(0) + HULL_PADDING_M]) * cfg.scene.world_scale
    return torch.as_tensor(box, dtype=torch.float32), "mattes"


def hull_cell_mask(hull: np.ndarray, box: torch.Tensor, resolution: int, world_scale: float) -> torch.Tensor:
    """Occupancy cells ([R, R, R] bool) that hold a hull voxel, grown by one cell (the subject moves between
    the frames the hull was carved at, and hair is thinner than a matte can see)."""
    unit = (torch.as_tensor(hull, dtype=torch.float32) * world_scale - box[0]) / (box[1] - box[0])
    ijk = torch.clamp((unit * resolution).long(), 0, resolution - 1)
    mask = torch.zeros(resolution, resolution, resolution)
    mask[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = 1.0
    grown = torch.nn.functional.max_pool3d(mask[None, None], kernel_size=3, stride=1, padding=1)[0, 0]
    return grown > 0


# --- checkpoints ------------------------------------------------------------------------------------------


def _remove_checkpoints(work: SequenceWorkDir, keep: int | None = None) -> None:
    """Delete checkpoint files: all of them, or all but the ``KEEP_CHECKPOINTS`` newest up to step ``keep``."""
    if not work.is_local:
        return
    steps = checkpoint_steps(work)
    kept = [] if keep is None else [s for s in steps if s <= keep][-KEEP_CHECKPOINTS:]
    for step in steps:
        if step not in kept:
            Path(work.path(checkpoint_path(step))).unlink(missing_ok=True)


# --- the stage --------------------------------------------------------------------------------------------


def optimize_sequence(sequence_work_dir: str | os.PathLike[str], config: OptimizeConfig | None = None,
                      progress: ProgressCallback | None = None) -> dict:
    """Train NeRSemble on one sequence (``<work>/<PID>/<SEQ>``); returns the stage report.

    Needs ingest, calibrate and matte; depth is used when its stage ran (and ``use_depth``), else the depth
    losses are off. Skipped when its record matches this config and the upstream records.
    """
    config = config or OptimizeConfig()

    def decide(store: CaptureStore) -> Decision[TrainPlan]:
        plan = plan_training(store, config)
        # the hold-out request is not hashed: the set it resolves to goes into the input digest
        hashed = {k: v for k, v in config.result_fields().items() if k not in ("holdout", "holdout_cameras")}
        return Decision(plan, {**hashed, "model": plan.model.to_dict(), "use_depth": plan.use_depth},
                        extra=digest_part(plan.holdout), record_choice=lambda store: record_holdout(store, plan.held))

    def train(run: StageRun, plan: TrainPlan) -> dict:
        with torch_threads(config.threads), stop_on_signals() as stop:
            return _train(run, config, plan, progress, stop)

    return run_stage(SequenceWorkDir(sequence_work_dir), STAGE, VERSION, config.lock_timeout, decide, train)


@dataclass(frozen=True)
class TrainPlan:
    """What is decided before training: the model config, where it trains, and on which cameras."""

    model: NeRSembleConfig
    device: torch.device
    backend: str
    train: list[str]
    holdout: list[str]
    use_depth: bool
    held: HoldoutSet  # the sequence's hold-out set: ``holdout``, with how and why it was chosen


def plan_training(store: CaptureStore, config: OptimizeConfig) -> TrainPlan:
    """Check the calibration is there and resolve the config against this store; writes nothing.

    The hold-out set is the sequence's (``stages.geometry.holdout``); depth maps made with another are refused.
    """
    if store.intrinsics is None or store.world_2_cam is None:
        raise StageOrderError(f"{store.uri}: no camera calibration in the store (calibrate record "
                              f"{store.stage_record('calibrate').finished_at}); run `{PRODUCED_BY['calibrate']}`")
    cfg = model_config(config)
    device = resolve_device(config.device, STAGE)
    backend = resolve_backend(config.encoding, device)
    held = plan_holdout(store, config)
    use_depth = config.use_depth and store.stage_record("depth") is not None
    return TrainPlan(cfg, device, backend, held.train(store.cameras), list(held.cameras), use_depth, held)


def build_trainer(store: CaptureStore, train: list[str], cfg: NeRSembleConfig, device: torch.device, backend: str,
                  use_depth: bool, box_m: tuple | None = None, resumed: dict | None = None,
                  kernel_fallback: bool = True) -> tuple[Trainer, str]:
    """The model and its trainer on the store's training cameras, and where the scene box came from.

    Fresh: the box and the occupancy mask come from the mattes' hull, the weights from the config's seed.
    ``resumed``: box, weights, occupancy masks and optimiser state come back from that checkpoint.
    ``kernel_fallback``: a Triton kernel failing on first use falls back to torch (``--encoding auto``) or raises.
    """
    if resumed is not None:
        hull, box, box_source = None, resumed["scene_box"], "checkpoint"
    else:
        hull = matte_hull_points(store, train)
        box, box_source = scene_box(store, train, cfg, hull, box_m)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the initial weights are part of what the seed fixes
        model = NeRSembleModel(cfg, store.n_frames, box, backend=backend).to(device)
        model.allow_kernel_fallback(kernel_fallback)
    trainer = Trainer(model, StoreImageSource(store, train, use_depth), device)
    if resumed is not None:
        trainer.load_state_dict(resumed)
    elif cfg.occupancy.matte_hull and hull is not None:
        model.restrict_occupancy(hull_cell_mask(hull, model.scene_box.cpu(), cfg.occupancy.resolution,
                                                cfg.scene.world_scale))
    return trainer, box_source


def _out_of_memory_message(cfg: NeRSembleConfig) -> str:
    smaller_preset = "" if cfg.name == "preview" else ", or use --preset preview"
    budget = (f", train.max_rays_per_batch ({cfg.train.max_rays_per_batch})"
              if cfg.train.target_samples_per_batch else "")
    return (f"optimize ran out of GPU memory; lower train.rays_per_batch ({cfg.train.rays_per_batch}){budget}, "
            f"eval.chunk ({cfg.eval.chunk}), hash.log2_table_size ({cfg.hash.log2_table_size}) or hash.n_grids "
            f"({cfg.hash.n_grids}) with --override{smaller_preset}")


def _train(run: StageRun, config: OptimizeConfig, plan: TrainPlan, progress: ProgressCallback | None,
           stop: StopRequest | None = None) -> dict:
    store, work, cfg, device, backend = run.store, run.work, plan.model, plan.device, plan.backend
    train, holdout, use_depth = plan.train, plan.holdout, plan.use_depth
    run_id = f"{run.config_hash}:{run.input_digest}"
    warnings: list[str] = []
    resumed = latest_checkpoint(work, skipped=warnings, warnings=warnings) if config.resume else None
    if resumed is not None and resumed.get("run_id") != run_id:
        resumed = None  # another config or other upstream results: start over
    trainer, box_source = build_trainer(store, train, cfg, device, backend, use_depth, config.scene_box, resumed,
                                        kernel_fallback=config.encoding == "auto")
    model, box = trainer.model, trainer.model.scene_box.cpu()
    if resumed is None:
        _remove_checkpoints(work)
        work.write_text("nersemble/train.log", "")
    start_step = trainer.state.step
    resumed_note = f"resumed from step {start_step}" if resumed is not None else None
    if resumed_note:
        work.append_text("nersemble/train.log", f"{resumed_note}\n")
    extra = {"run_id": run_id, "train_cameras": train, "holdout_cameras": holdout}

    def write_checkpoint() -> None:
        step = trainer.state.step
        work.write_bytes(checkpoint_path(step), save_checkpoint(trainer.state_dict(extra)))
        _remove_checkpoints(work, keep=step)

    def report_progress(p: TrainingProgress) -> None:
        terms = " ".join(f"{k}={v:.4g}" for k, v in p.losses.items())
        # Appended as it comes, so a killed run's log keeps every line up to the kill.
        work.append_text("nersemble/train.log",
                         f"step {p.step}/{p.total_steps} psnr={p.psnr:.2f} {terms} rays/s={p.rays_per_s:.0f} "
                         f"samples/ray={p.samples_per_ray:.1f} rays/step={p.rays_per_step:.0f} "
                         f"elapsed={p.elapsed_s:.1f}s\n")
        if progress is not None:
            progress(p)

    work.write_json("nersemble/config.json", {"model": cfg.to_dict(), "optimize": config.model_dump(),
                                              "train_cameras": train, "holdout_cameras": holdout,
                                              "scene_box": box.tolist(), "scene_box_from": box_source,
                                              "use_depth": use_depth, "device": str(device)})
    try:
        stopped_by = trainer.train(time_budget_s=config.time_budget_s, progress=report_progress,
                                   progress_every=max(1, min(cfg.train.eval_every_batch, 25)),
                                   checkpoint=write_checkpoint, checkpoint_every=cfg.train.checkpoint_every,
                                   checkpoint_every_s=config.checkpoint_every_s, should_stop=stop)
    except torch.cuda.OutOfMemoryError:
        raise PipelineError(_out_of_memory_message(cfg)) from None
    history = trainer.state.history
    work.write_bytes("nersemble/training_curves.png", training_curves_png(history))
    last = history[-1] if history else {}
    report = {
        "status": Status.INTERRUPTED if stopped_by == "interrupted" else Status.COMPLETED,
        "preset": cfg.name,
        "steps": trainer.state.step,
        "steps_planned": cfg.train.steps,
        "stopped_by": stopped_by,
        "resumed_from_step": start_step if resumed is not None else None,
        "resumed": resumed_note,
        "train_seconds": round(trainer.state.elapsed_s, 1),
        "psnr_train": round(last.get("psnr", float("nan")), 2),
        "loss": round(last.get("total", float("nan")), 6),
        "samples_per_ray": round(last.get("samples", float("nan")), 1),
        "rays_per_step": round(last.get("rays", 0)),
        "rays": trainer.state.rays,
        "device": str(device),
        "encoding": model.field.encoding.__class__.__name__,
        "kernels": model.kernels_used(),  # which implementation ran each part, and any fallback's reason
        "train_cameras": train,
        "holdout_cameras": holdout,
        "holdout": store.holdout,  # the sequence's record: these cameras, how and why they were chosen
        "use_depth": use_depth,
        "scene_box_m": (box / cfg.scene.world_scale).tolist(),
        "scene_box_from": box_source,
        "checkpoint": checkpoint_path(trainer.state.step),
        "warnings": warnings,
        "config": config.model_dump(),
    }
    if stopped_by == "interrupted":  # a report, and no record: the next run resumes from the checkpoint
        work.write_report(STAGE, report)
        signum = stop.signum if stop is not None and stop.signum is not None else signal.SIGTERM
        raise TrainingInterrupted(
            f"optimize interrupted by {stop.signal_name if stop else 'a stop request'} at step "
            f"{trainer.state.step}/{cfg.train.steps}; checkpoint {work.path(report['checkpoint'])} written: run "
            f"the same command again to resume", signum)
    return run.finish(report)
