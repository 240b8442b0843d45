"""Export: turntable, hold-out, camera-path and benchmark videos rendered from the trained NeRSemble model.

Everything that can fail on bad input (the camera path file, the path cameras, the device, a missing or
mismatched model) is checked before the first frame is rendered. Videos are H.264 (yuv420p) at the configured
CRF (14 by default, as the benchmark uses) with exactly the planned number of frames, rendered one frame at a
time in ``chunk``-ray pieces so memory stays bounded at any resolution (``stages.rendering.render``).

Outputs under ``export/``: ``turntable.mp4``, ``holdout/cam_<SERIAL>.mp4``, ``path.mp4`` (camera path file),
``rig_path.mp4`` (through chosen rig cameras), optional ``*_depth.mp4`` / ``*_alpha.mp4`` / ``*_rgba/`` beside
each, and ``benchmark/<PID>/<SEQ>/cam_<SERIAL>.mp4`` plus ``benchmark/nvs_submission.zip`` in the NeRSemble
benchmark's NVS layout.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core.cameras import intrinsics_for_size
from stages.export.config import ExportConfig
from stages.core.errors import PipelineError
from stages.core.skeleton import Decision, StageRun, run_stage
from stages.core.status import Status
from stages.geometry.holdout import digest_part, recorded_cameras
from stages.rendering.model import (StoreCameras, load_checked_model, render_size, resolve_device,
                                 store_cameras, torch_threads)
from stages.rendering.paths import (CameraPath, CameraView, expand_path, read_camera_path, render_intrinsics,
                                 rig_camera_path, rig_frame, turntable_path)
from stages.rendering.render import VideoJob, depth_range_for, local_output, progress_ticker, render_job
from storage import CaptureStore, SequenceWorkDir, digest_of

STAGE = "export"
VERSION = "1"
BENCHMARK_NVS_HOLDOUT = ("222200046", "222200037", "222200039")  # the benchmark's NVS hold-out serials
BENCHMARK_ZIP = "export/benchmark/nvs_submission.zip"

ProgressCallback = Callable[[int, int], None]  # (frames rendered, frames in all)


@dataclass
class ExportPlan:
    """What was decided and checked before rendering."""

    device: torch.device
    cameras: StoreCameras
    path: CameraPath | None
    path_digest: str | None
    warnings: list[str] = field(default_factory=list)


def plan_export(store: CaptureStore, config: ExportConfig) -> ExportPlan:
    """Check every option against the store; reads the camera path file (errors name the file and keyframe)."""
    device = resolve_device(config.device, STAGE)
    cameras = store_cameras(store, STAGE)
    if not (config.turntable or config.holdout or config.path or config.path_cameras or config.benchmark):
        raise PipelineError("export: nothing to render; choose --turntable, --holdout, --path, --through-cameras "
                            "or --benchmark")
    path, path_digest = None, None
    if config.path:
        path = read_camera_path(config.path)
        path_digest = digest_of(Path(config.path).read_bytes().decode("utf-8", errors="replace"))
    unknown = [s for s in config.path_cameras or [] if s not in cameras.serials]
    if unknown:
        raise PipelineError(f"export --through-cameras: {', '.join(unknown)} not in this capture "
                            f"(cameras: {', '.join(cameras.serials)})")
    width, height = config.benchmark_size
    if config.benchmark and (width % 2 or height % 2):
        raise PipelineError(f"export --benchmark-size {width}x{height}: H.264 yuv420p needs even sizes")
    return ExportPlan(device=device, cameras=cameras, path=path, path_digest=path_digest)


def export_sequence(sequence_work_dir: str | os.PathLike[str], config: ExportConfig = ExportConfig(),
                    progress: ProgressCallback | None = None) -> dict:
    """Render the configured videos of one sequence (``<work>/<PID>/<SEQ>``); returns the stage report.

    Needs the ingest, calibrate, matte and optimize records; skipped when its own record matches this config
    (including the camera path file's contents) and those upstream records.
    """
    work = SequenceWorkDir(sequence_work_dir)

    def decide(store: CaptureStore) -> Decision[ExportPlan]:
        plan = plan_export(store, config)
        # the sequence's recorded hold-out set: a new one re-checks the model (trained with another, it is refused)
        return Decision(plan, {**config.result_fields(), "path_digest": plan.path_digest},
                        extra=digest_part(recorded_cameras(store)))

    def prepare(store: CaptureStore, plan: ExportPlan) -> tuple[ExportPlan, Any]:
        return plan, load_checked_model(work, store, plan.device, STAGE, config.eval_substeps, plan.warnings)

    return run_stage(work, STAGE, VERSION, config.lock_timeout, decide,
                     lambda run, ready: _run(run, config, *ready, progress), prepare=prepare)


# --- what to render ----------------------------------------------------------------------------------------------


def _scene_centre(model: Any) -> np.ndarray:
    """The model's scene box centre in metres: where the subject is, by construction of the box."""
    box = model.scene_box.detach().cpu().double().numpy()
    return box.mean(axis=0) / float(model.config.scene.world_scale)


def _half_extent(model: Any) -> float:
    box = model.scene_box.detach().cpu().double().numpy()
    return float((box[1] - box[0]).min()) / 2 / float(model.config.scene.world_scale)


def _timestep_views(cameras: StoreCameras, serial: str, size: tuple[int, int], n_timesteps: int) -> list[CameraView]:
    """One rig camera at every timestep, K rescaled to ``size``."""
    K = intrinsics_for_size(cameras.intrinsics[serial], (cameras.width, cameras.height), size)
    w2c = np.asarray(cameras.world_2_cam[serial], dtype=np.float64)
    return [CameraView(K=K, world_2_cam=w2c, width=size[0], height=size[1], time=t / max(n_timesteps - 1, 1))
            for t in range(n_timesteps)]


def participant_folder(participant: str) -> str:
    """The benchmark's zero-padded participant folder (``<PID:03d>``); non-numeric IDs stay verbatim."""
    return f"{int(participant):03d}" if participant.isdigit() else participant


def build_jobs(config: ExportConfig, plan: ExportPlan, trained: Any, work: SequenceWorkDir) -> list[VideoJob]:
    """Every video to render, in order; companion outputs follow the background and depth options."""
    cameras, model, T = plan.cameras, trained.model, trained.n_timesteps
    size = render_size(cameras.width, cameras.height, config.resolution_scale)
    centre, half = _scene_centre(model), _half_extent(model)
    extras = {"depth": config.depth_videos, "alpha": config.depth_videos or config.background == "transparent",
              "rgba_frames": config.background == "transparent"}
    jobs: list[VideoJob] = []

    def add(name: str, views: list[CameraView], fps: float, companions: bool = True) -> None:
        options = extras if companions else {}
        jobs.append(VideoJob(name=name, views=views, fps=fps, crf=config.crf,
                             depth_range_m=depth_range_for(views, centre, half), **options))

    if config.turntable:
        frames = max(1, round(config.seconds * config.fps))
        rig = rig_frame([cameras.world_2_cam[s] for s in cameras.serials], centre)
        K = render_intrinsics([cameras.intrinsics[s] for s in cameras.serials], (cameras.width, cameras.height), size)
        add("turntable", turntable_path(rig, K, size[0], size[1], frames, radius=config.radius_m,
                                        elevation_deg=config.elevation_deg, trajectory=config.trajectory,
                                        arc_deg=config.arc_deg), config.fps)
    if config.holdout:
        if not trained.holdout_cameras:
            plan.warnings.append("the model was trained without hold-out cameras; no hold-out videos")
        for serial in trained.holdout_cameras:
            add(f"holdout/cam_{serial}", _timestep_views(cameras, serial, size, T), config.fps)
    if plan.path is not None:
        frames = max(1, round(config.seconds * config.fps))
        add("path", expand_path(plan.path, frames), plan.path.fps or config.fps)
    if config.path_cameras:
        frames = max(1, round(config.seconds * config.fps))
        keyframes = rig_camera_path(config.path_cameras, cameras.intrinsics, cameras.world_2_cam,
                                    (cameras.width, cameras.height), size)
        add("rig_path", expand_path(keyframes, frames), config.fps)
    if config.benchmark:
        serials = list(trained.holdout_cameras)
        if not serials:
            raise PipelineError("export --benchmark: the model has no hold-out cameras to submit; train with "
                                "hold-out cameras (the NVS task holds out " + ", ".join(BENCHMARK_NVS_HOLDOUT) + ")")
        if sorted(serials) != sorted(BENCHMARK_NVS_HOLDOUT):
            plan.warnings.append(f"benchmark: the model's hold-out cameras ({', '.join(serials)}) are not the NVS "
                                 f"task's ({', '.join(BENCHMARK_NVS_HOLDOUT)}); the submission has the model's")
        folder = f"benchmark/{participant_folder(work.participant)}/{work.sequence}"
        for serial in serials:
            jobs.append(VideoJob(name=f"{folder}/cam_{serial}", crf=config.crf, fps=config.benchmark_fps,
                                 views=_timestep_views(cameras, serial, tuple(config.benchmark_size), T)))
    return jobs


# --- running --------------------------------------------------------------------------------------------------


def write_benchmark_zip(work: SequenceWorkDir, jobs: list[VideoJob]) -> str:
    """The submission zip: entries ``<PID:03d>/<SEQ>/cam_<SERIAL>.mp4`` (stored: mp4 is already compressed)."""
    with local_output(work, BENCHMARK_ZIP) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for job in jobs:
                entry = job.name.removeprefix("benchmark/") + ".mp4"
                archive.writestr(entry, work.read_bytes(f"export/{job.name}.mp4"))
    return BENCHMARK_ZIP


def _run(run: StageRun, config: ExportConfig, plan: ExportPlan, trained: Any,
         progress: ProgressCallback | None) -> dict:
    work = run.work
    started = time.perf_counter()
    jobs = build_jobs(config, plan, trained, work)
    total = sum(len(job.views) for job in jobs)
    tick = progress_ticker(progress, total)
    results: dict[str, dict] = {}
    with torch_threads(config.threads):
        for job in jobs:
            results[job.name] = render_job(trained.model, job, work, trained.n_timesteps, config.chunk, tick)
    benchmark_jobs = [job for job in jobs if job.name.startswith("benchmark/")]
    submission = write_benchmark_zip(work, benchmark_jobs) if benchmark_jobs else None
    wall = time.perf_counter() - started
    render_wall = sum(r["render_seconds"] for r in results.values())
    report = {
        "stage": STAGE,
        "status": Status.COMPLETED,
        "store": work.capture_uri,
        "device": str(plan.device),
        "model_step": trained.step,
        "eval_substeps": trained.config.sampler.eval_substeps,
        "holdout_cameras": list(trained.holdout_cameras),
        "holdout": run.store.holdout,  # the sequence's record: how and why these cameras were held out
        "timesteps": trained.n_timesteps,
        "videos": results,
        "benchmark_submission": submission,
        "frames": total,
        "seconds": round(wall, 3),
        "frames_per_second": round(total / wall, 3) if wall else None,
        "render_seconds": round(render_wall, 3),
        "codec": {"vcodec": "libx264 (H.264)", "pix_fmt": "yuv420p", "crf": config.crf},
        "warnings": plan.warnings,
        "config": config.model_dump(),
        "config_hash": run.config_hash,
    }
    return run.finish(report)
