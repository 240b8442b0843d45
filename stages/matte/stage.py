"""Matte: the store's ``alpha`` (C, T, H, W uint8, soft edges) from background plates and a saliency model.

Every camera is matted by its own worker, which streams that camera's frames with a window of
``temporal_radius`` neighbours on each side and writes only that camera's alpha chunks, so workers never share
a chunk and memory stays at a few frames per worker. Everything that can be decided without matting (which
method each camera gets, whether the model file and user plates exist and fit) is decided before the first
chunk is written; a camera that fails mid-way stops the others at a frame boundary, so cameras not reached
keep their previous alpha, and the stage record, cleared before rewriting, stays cleared.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from stages.matte.config import MatteConfig
from stages.core.errors import PipelineError
from stages.core.skeleton import Decision, StageRun, run_stage
from stages.core.status import Status
from stages.matte.methods import MAX_PLATE_NOISE, FrameMatte, matte_fused, matte_plate, matte_saliency
from stages.matte.model import (ModelMissingError, ModelSpec, load_session, locate_model, saliency,
                                session_providers)
from stages.matte.plate import has_plate, to_float
from stages.matte.preview import contact_sheet, encode_png, spread
from stages.matte.refine import sliding_window, temporal_filter
from storage import CaptureStore, SequenceWorkDir, digest_of

STAGE = "matte"
VERSION = "1"
PREVIEW_PATH = "export/previews/matte.png"
PLATE_SUFFIXES = (".jpg", ".jpeg", ".png")
MIN_AGREEMENT = 0.5  # fused: plate-vs-model mask IoU below which the plate is suspect (typical: 0.8-0.95)
MAX_PLATE_COVERAGE = 0.9  # plate: a head never fills this much of a rig camera's frame

ProgressCallback = Callable[[str, int], None]  # (serial, frames matted so far)


class MattingError(PipelineError):
    """Matting failed for one or more cameras; the message names each camera."""


# --- planning: decided before anything is written ------------------------------------------------------------


@dataclass
class CameraPlan:
    """How one camera will be matted."""

    index: int
    serial: str
    method: str  # "plate", "rembg" or "fused"
    plate_file: Path | None = None  # a user-supplied plate that replaces the ingested one
    plate_source: str | None = None  # "store", "file" or None (no plate)


@dataclass
class MattePlan:
    cameras: list[CameraPlan]
    model: ModelSpec | None
    warnings: list[str] = field(default_factory=list)


def _find_plate_file(plate_dir: Path, serial: str) -> Path | None:
    """The NeRSemble BACKGROUND naming: ``image_<SERIAL>.jpg`` (png also accepted)."""
    for suffix in PLATE_SUFFIXES:
        path = plate_dir / f"image_{serial}{suffix}"
        if path.is_file():
            return path
    return None


def read_plate_file(path: Path, height: int, width: int, serial: str, warnings: list[str]) -> np.ndarray | None:
    """A user plate as (H, W, 3) RGB at the store's frame size; None (with a warning) if it cannot be used.

    A plate of another size but the same aspect ratio is resized (it was shot at another resolution);
    one of another aspect ratio belongs to another camera or crop, so it is refused.
    """
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        warnings.append(f"{path}: background plate of camera {serial} cannot be read; ignored")
        return None
    plate_h, plate_w = image.shape[:2]
    if (plate_h, plate_w) != (height, width):
        if abs(plate_w / plate_h - width / height) > 0.01:
            warnings.append(f"{path}: background plate of camera {serial} is {plate_w}x{plate_h}, but its frames are "
                            f"{width}x{height} (another aspect ratio); ignored")
            return None
        warnings.append(f"{path}: background plate of camera {serial} is {plate_w}x{plate_h}, resized to the "
                        f"frames' {width}x{height}")
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _user_plate(config: MatteConfig, store: CaptureStore, serial: str, warnings: list[str]) -> Path | None:
    """The plate file for a camera from ``config.plate_dir``, if there is a usable one."""
    if config.plate_dir is None:
        return None
    path = _find_plate_file(Path(config.plate_dir), serial)
    if path is None:
        warnings.append(f"camera {serial}: no image_{serial}.jpg/png in {config.plate_dir}; using the ingested plate")
        return None
    if read_plate_file(path, store.height, store.width, serial, warnings) is None:
        return None
    return path


def _choose_method(requested: str, plate_source: str | None) -> str:
    """auto: fused with a plate, rembg without; plate/fused without a plate fall back to rembg."""
    if requested == "rembg":
        return "rembg"
    if plate_source is not None:
        return "fused" if requested in ("auto", "fused") else "plate"
    return "rembg"


def plate_summary(requested: str, without: list[str], total: int) -> str | None:
    """One line for every camera that falls back to rembg for want of a plate (the report names each camera)."""
    if requested == "rembg" or not without:
        return None
    shown = "" if len(without) == total else f" ({', '.join(without[:8])}{', ...' if len(without) > 8 else ''})"
    return (f"no background plates for {len(without)}/{total} cameras{shown}: matting with rembg"
            + ("" if requested == "auto" else f" instead of {requested}"))


def plan_matte(store: CaptureStore, config: MatteConfig) -> MattePlan:
    """Pick each camera's method and locate the model, before any chunk is written."""
    if config.plate_dir is not None and not Path(config.plate_dir).is_dir():
        raise FileNotFoundError(f"plate folder {config.plate_dir} does not exist")
    warnings: list[str] = []
    cameras = []
    for index, serial in enumerate(store.cameras):
        plate_file = _user_plate(config, store, serial, warnings)
        source = "file" if plate_file else ("store" if has_plate(store.read_background(index)) else None)
        method = _choose_method(config.method, source)
        cameras.append(CameraPlan(index, serial, method, plate_file, source if method != "rembg" else None))
    summary = plate_summary(config.method, [c.serial for c in cameras if c.plate_source is None], len(cameras))
    warnings += [summary] if summary else []
    return MattePlan(cameras=cameras, model=_model_for(cameras, config), warnings=warnings)


def _model_for(cameras: list[CameraPlan], config: MatteConfig) -> ModelSpec | None:
    """Locate the model if any camera needs it; the error names the cameras that do."""
    needing = [c.serial for c in cameras if c.method in ("rembg", "fused")]
    if not needing:
        return None
    try:
        return locate_model(config.model)
    except ModelMissingError as error:
        if config.method == "plate":  # only the fallback cameras need it: say which
            raise ModelMissingError(f"camera(s) {', '.join(needing)} have no background plate and fall back to "
                                    f"rembg, which needs its model: {error}") from None
        raise


def files_digest(plan: MattePlan) -> str:
    """The model file and any user plates: beside the ingest record, a change in any of them re-runs matting."""
    plates = [(c.serial, str(c.plate_file), c.plate_file.stat().st_size, c.plate_file.stat().st_mtime_ns)
              for c in plan.cameras if c.plate_file is not None]
    model = plan.model.digest_parts() if plan.model else None
    return digest_of(model, plates)


# --- one camera ------------------------------------------------------------------------------------------------


class _Stopped(Exception):
    """Another camera failed; stop at a frame boundary."""


@dataclass
class _CameraResult:
    serial: str
    method: str
    plate: str | None
    frames: int = 0
    coverage_sum: float = 0.0
    noise: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "plate": self.plate,
            "frames": self.frames,
            "coverage": round(self.coverage_sum / self.frames, 4) if self.frames else None,
            "seconds": round(self.seconds, 3),
            "fps": round(self.frames / self.seconds, 2) if self.seconds else None,
            "plate_noise": round(float(np.median(self.noise)) * 255, 3) if self.noise else None,
            "plate_model_agreement": round(float(np.median(self.agreement)), 3) if self.agreement else None,
        }

    def warnings(self) -> list[str]:
        """Signs that a plate does not belong to this take (the camera moved, the light changed a lot)."""
        out = []
        if self.noise and np.median(self.noise) > MAX_PLATE_NOISE:
            fallback = "; matted with rembg where it does" if self.method == "fused" else ""
            out.append(f"camera {self.serial}: the plate matches the backdrop poorly (residual noise "
                       f"{np.median(self.noise) * 255:.1f}/255, usually under {MAX_PLATE_NOISE * 255:.0f}); check "
                       f"that the plate belongs to this camera and take{fallback}")
        if self.agreement and np.median(self.agreement) < MIN_AGREEMENT:
            out.append(f"camera {self.serial}: the plate's and the model's masks agree poorly (median IoU "
                       f"{np.median(self.agreement):.2f}); check that the plate belongs to this take")
        if self.method == "plate" and self.frames and self.coverage_sum / self.frames > MAX_PLATE_COVERAGE:
            out.append(f"camera {self.serial}: the plate differs from {self.coverage_sum / self.frames:.0%} of the "
                       "frame; check that the plate belongs to this take")
        return out


def _camera_plate(store: CaptureStore, camera: CameraPlan) -> np.ndarray | None:
    if camera.plate_source is None:
        return None
    if camera.plate_file is not None:
        return read_plate_file(camera.plate_file, store.height, store.width, camera.serial, [])
    return store.read_background(camera.index)


def _frame_matte(frame_u8: np.ndarray, plate: np.ndarray | None, method: str, session: Any,
                 config: MatteConfig) -> tuple[np.ndarray, FrameMatte]:
    """One frame's (float frame, matte) by the camera's method."""
    frame = to_float(frame_u8)
    if method == "plate":
        return frame, matte_plate(frame, plate, config)
    mask = saliency(session, frame_u8)
    if method == "rembg":
        return frame, matte_saliency(frame, mask, config)
    return frame, matte_fused(frame, plate, mask, config)


def _per_frame(store: CaptureStore, camera: CameraPlan, session: Any, config: MatteConfig,
               stop: threading.Event) -> Iterator[tuple[int, np.ndarray, FrameMatte]]:
    """Stream (t, frame, matte) for one camera, reading one frame at a time."""
    plate = _camera_plate(store, camera)
    for t in range(store.n_frames):
        if stop.is_set():
            raise _Stopped
        frame, matte = _frame_matte(store.read_frame(camera.index, t), plate, camera.method, session, config)
        yield t, frame, matte


def to_uint8(alpha: np.ndarray) -> np.ndarray:
    """[0, 1] float alpha -> the store's 0-255."""
    return np.round(np.clip(alpha, 0.0, 1.0) * 255.0).astype(np.uint8)


def _matte_camera(store: CaptureStore, camera: CameraPlan, session: Any, config: MatteConfig,
                  stop: threading.Event, progress: ProgressCallback | None) -> _CameraResult:
    """Matte every frame of one camera and write its alpha chunks (and only those)."""
    result = _CameraResult(camera.serial, camera.method, camera.plate_source)
    started = time.perf_counter()
    try:
        stream = _per_frame(store, camera, session, config, stop)
        for (t, frame, matte), neighbours in sliding_window(stream, config.temporal_radius):
            alpha = temporal_filter(frame, matte.alpha, [(f, m.alpha) for _, f, m in neighbours],
                                    config.temporal_cutoff) if neighbours else matte.alpha
            if stop.is_set():
                raise _Stopped
            alpha_u8 = to_uint8(alpha)
            store.write_alpha(camera.index, t, alpha_u8)
            result.frames = t + 1
            result.coverage_sum += float(alpha_u8.mean()) / 255.0
            if matte.noise is not None:
                result.noise.append(matte.noise)
            if matte.agreement is not None:
                result.agreement.append(matte.agreement)
            if progress:
                progress(camera.serial, t + 1)
    except _Stopped:
        result.error = "stopped because another camera failed"
    except Exception as error:  # one camera's failure must name it and stop the others, whatever raised it
        result.error = f"camera {camera.serial}: {type(error).__name__}: {error}"
        stop.set()
    result.seconds = time.perf_counter() - started
    return result


# --- the stage -----------------------------------------------------------------------------------------------


def _as_work_dir(work_dir: str | os.PathLike[str] | SequenceWorkDir) -> SequenceWorkDir:
    return work_dir if isinstance(work_dir, SequenceWorkDir) else SequenceWorkDir(work_dir)


def matte_sequence(work_dir: str | os.PathLike[str] | SequenceWorkDir, config: MatteConfig | None = None,
                   progress: ProgressCallback | None = None) -> dict:
    """Fill ``alpha`` of ``<work_dir>/capture.zarr``; returns the stage report (``status`` "skipped" if up to date)."""
    config = config or MatteConfig()

    def decide(store: CaptureStore) -> Decision[MattePlan]:
        plan = plan_matte(store, config)
        return Decision(plan, config.result_fields(), extra=files_digest(plan))

    return run_stage(_as_work_dir(work_dir), STAGE, VERSION, config.lock_timeout, decide,
                     lambda run, plan: _run_matte(run, plan, config, progress))


# One frame's matting holds float temporaries (colour distances, guided-filter boxes) worth several dozen uint8
# frames, and its temporal window keeps a few float frames more (measured with tracemalloc, plate and fused, the
# figures in benchmarks/EXPERIMENTS.md). The workers chosen automatically share this budget; the model and
# onnxruntime, a fixed cost whatever the frame size, take the rest of the stage's 4 GB.
FRAME_WORKING_SET = 90  # uint8 frames per worker
WORKERS_MEMORY_BUDGET = 5 << 29  # 2.5 GiB


def _worker_count(config: MatteConfig, cameras: int, height: int, width: int) -> int:
    """Cameras matted at once: ``--workers``, or one per core as far as the memory budget allows."""
    if config.workers:
        return max(1, min(cameras, config.workers))
    by_memory = WORKERS_MEMORY_BUDGET // (FRAME_WORKING_SET * height * width * 3)
    return max(1, min(cameras, os.cpu_count() or 1, by_memory))


def _run_matte(run: StageRun, plan: MattePlan, config: MatteConfig, progress: ProgressCallback | None) -> dict:
    store, work = run.store, run.work
    workers = _worker_count(config, len(plan.cameras), store.height, store.width)
    threads = config.onnx_threads or max(1, (os.cpu_count() or 1) // workers)
    session = load_session(plan.model, threads, config.device) if plan.model else None
    stop = threading.Event()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="matte") as pool:
        futures = [pool.submit(_matte_camera, store, camera, session, config, stop, progress)
                   for camera in plan.cameras]
        results = [future.result() for future in futures]
    wall = time.perf_counter() - started

    failures = [r.error for r in results if r.error and not r.error.startswith("stopped")]
    if failures:
        work.write_report(STAGE, {"stage": STAGE, "status": Status.FAILED, "errors": failures, "warnings": plan.warnings,
                                  "cameras_finished": [r.serial for r in results if not r.error]})
        raise MattingError("matting failed; the store's matte is not marked complete:\n  " + "\n  ".join(failures))

    preview = _write_preview(store, work, config)
    report = _report(store, work, plan, config, results, wall, workers, preview, run.config_hash)
    report["onnx_providers"] = session_providers(session) if session is not None else []
    return run.finish(report)


def _write_preview(store: CaptureStore, work: SequenceWorkDir, config: MatteConfig) -> str:
    sheet = contact_sheet(store, spread(store.n_cameras, config.preview_cameras),
                          spread(store.n_frames, config.preview_frames))
    return work.write_bytes(PREVIEW_PATH, encode_png(sheet))


def _report(store: CaptureStore, work: SequenceWorkDir, plan: MattePlan, config: MatteConfig,
            results: list[_CameraResult], wall: float, workers: int, preview: str, chash: str) -> dict:
    cameras = {r.serial: r.summary() for r in results}
    matted = sum(r.frames for r in results)
    methods: dict[str, int] = {}
    for r in results:
        methods[r.method] = methods.get(r.method, 0) + 1
    return {
        "stage": STAGE,
        "status": Status.COMPLETED,
        "store": work.capture_uri,
        "method": config.method,
        "methods": methods,
        "cameras": cameras,
        "frames": store.n_frames,
        "frames_matted": matted,
        "coverage": round(sum(r.coverage_sum for r in results) / matted, 4) if matted else None,
        "seconds": round(wall, 3),
        "frames_per_second": round(matted / wall, 2) if wall else None,
        "workers": workers,
        "model": str(plan.model.path) if plan.model else None,
        "preview": preview,
        "warnings": plan.warnings + [w for r in results for w in r.warnings()],
        "config": config.model_dump(),
        "config_hash": chash,
    }
