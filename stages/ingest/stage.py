"""Ingest: raw multi-camera videos -> the chunked capture store.

Every camera is decoded by its own worker, which writes only that camera's chunks, so workers never share
a chunk and memory stays at a few frames per worker. Everything that can be checked without decoding
(layout, calibration, sizes) is checked before the store is touched; the stage record is written last, so
a failed ingest never leaves a store that looks complete.

Crash safety: a (re-)ingest goes through ``CaptureStore.rebuild``, which marks the store as being rebuilt
before it deletes anything and unmarks it (``seal``) only after the record is written. A run killed at any
point (SIGKILL mid-delete included) leaves the marker; every other stage then refuses the store with a
message to run ingest again, and the next ingest deletes what is left and builds it anew. A store that is
not marked but damaged (a deleted chunk, an array's metadata gone) is rebuilt too, since its record no
longer counts as complete; a zarr group at that path that is not a capture store is never overwritten.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from stages.core.cameras import CameraParams, intrinsics_for_size, read_camera_params
from stages.core.color import apply_color_correction, read_color_calibration
from stages.ingest.checks import (check_calibration_size, check_cameras_see_subject, check_frame_memory,
                                  check_principal_points)
from stages.ingest.config import IngestConfig
from stages.core.errors import CaptureLayoutError, PipelineError, VideoError
from stages.core.raw_capture import RawSequence, discover_sequence
from stages.core.video import VideoInfo, iter_frames, probe_video
from stages.core.skeleton import StageRun, rerun_note, skipped_report
from stages.core.status import Status
from storage import CaptureStore, CaptureStoreError, SequenceWorkDir, config_hash, digest_of, sequence_lock
from storage.capture_store import rewrite_interrupted

STAGE = "ingest"
VERSION = "1"
PROGRESS_EVERY = 4  # frames per camera between progress calls

ProgressCallback = Callable[[str, int], None]  # (serial, frames written so far)


class IngestError(PipelineError):
    """Decoding failed for one or more cameras; the message names each camera and file."""


@dataclass
class IngestPlan:
    """What will be written, decided before any frame is decoded."""

    raw: RawSequence
    serials: list[str]
    videos: dict[str, VideoInfo]
    source_size: tuple[int, int]  # (width, height) of the videos
    size: tuple[int, int]  # (width, height) stored
    capacity: int  # frames allocated per camera; trimmed to the common decoded length at the end
    calibration: CameraParams | None
    color_matrices: dict[str, np.ndarray]
    warnings: list[str] = field(default_factory=list)


def _stored_size(source_size: tuple[int, int], downscale: float) -> tuple[int, int]:
    return max(1, round(source_size[0] / downscale)), max(1, round(source_size[1] / downscale))


def _frames_after_selection(available: int, config: IngestConfig) -> int:
    selected = max(0, math.ceil((available - config.start) / config.stride))
    return min(selected, config.count) if config.count else selected


def _select_cameras(raw: RawSequence, config: IngestConfig) -> list[str]:
    if not config.cameras:
        return raw.serials
    unknown = [serial for serial in config.cameras if serial not in raw.videos]
    if unknown:
        raise CaptureLayoutError(
            f"{raw.sequence_dir / 'images'}: no video for camera(s) {', '.join(unknown)}; "
            f"cameras with video: {', '.join(raw.serials)}"
        )
    return sorted(set(config.cameras))


def _check_calibration(raw: RawSequence, serials: list[str], warnings: list[str]) -> CameraParams | None:
    if raw.calibration is None:
        warnings.append(f"{raw.sequence_dir.parent.parent / 'calibration'}: no camera_params.json; run the calibrate stage")
        return None
    params = read_camera_params(raw.calibration)
    missing = [serial for serial in serials if serial not in params.world_2_cam]
    if missing:
        raise CaptureLayoutError(
            f"{raw.calibration}: no calibration for camera(s) {', '.join(missing)} that have video "
            f"({', '.join(str(raw.videos[s]) for s in missing)}); exclude them with --cameras or fix the file"
        )
    unused = sorted(set(params.world_2_cam) - set(raw.videos))
    if unused:
        warnings.append(f"{raw.calibration}: camera(s) {', '.join(unused)} are calibrated but have no video")
    return params


def plan_ingest(raw: RawSequence, config: IngestConfig) -> IngestPlan:
    """Validate the capture and decide sizes, without decoding a frame."""
    warnings: list[str] = []
    serials = _select_cameras(raw, config)
    with ThreadPoolExecutor(max_workers=8) as pool:  # each probe is one short ffmpeg process
        videos = dict(zip(serials, pool.map(probe_video, (raw.videos[s] for s in serials))))
    sizes = {(info.width, info.height) for info in videos.values()}
    if len(sizes) > 1:
        reference = videos[serials[0]]
        odd = [s for s in serials if (videos[s].width, videos[s].height) != (reference.width, reference.height)]
        details = ", ".join(f"camera {s} ({raw.videos[s]}) is {videos[s].width}x{videos[s].height}" for s in odd)
        raise CaptureLayoutError(
            f"videos differ in size: camera {serials[0]} is {reference.width}x{reference.height} but {details}"
        )
    source_size = sizes.pop()
    calibration = _check_calibration(raw, serials, warnings)
    calibrated_for = config.calibration_size or source_size
    if calibration is not None:
        check_calibration_size(calibrated_for, source_size, serials[0], raw.videos[serials[0]])
        check_principal_points(calibration, serials, calibrated_for, raw.calibration)
    check_cameras_see_subject(calibration, serials, calibrated_for, warnings)
    check_frame_memory(serials[0], source_size, _stored_size(source_size, config.downscale),
                       config.workers or min(len(serials), os.cpu_count() or 1))
    color_matrices: dict[str, np.ndarray] = {}
    if config.color_correction:
        if raw.color_calibration is None:
            raise CaptureLayoutError(f"--color-correction asked for, but {raw.sequence_dir.parent.parent / 'calibration'} "
                                     "has no color_calibration.json")
        all_matrices = read_color_calibration(raw.color_calibration)
        missing = [serial for serial in serials if serial not in all_matrices]
        if missing:
            raise CaptureLayoutError(f"{raw.color_calibration}: no colour matrix for camera(s) {', '.join(missing)}")
        color_matrices = {serial: all_matrices[serial] for serial in serials}
    estimates = [info.estimated_frames for info in videos.values() if info.estimated_frames]
    # The container's duration only sizes the allocation; frames are counted by decoding.
    upper_bound = (max(estimates) + 8 + max(estimates) // 20) if estimates else 100_000
    capacity = max(1, _frames_after_selection(upper_bound, config))
    return IngestPlan(
        raw=raw,
        serials=serials,
        videos=videos,
        source_size=source_size,
        size=_stored_size(source_size, config.downscale),
        capacity=capacity,
        calibration=calibration,
        color_matrices=color_matrices,
        warnings=warnings,
    )


def input_digest(plan: IngestPlan) -> str:
    """Names, sizes and modification times of every input file: a changed file means a new ingest."""
    files = [plan.raw.videos[s] for s in plan.serials] + [plan.raw.backgrounds[s] for s in plan.serials if s in plan.raw.backgrounds]
    files += [p for p in (plan.raw.calibration, plan.raw.color_calibration) if p is not None]
    participant_dir = plan.raw.sequence_dir.parent.parent
    return digest_of(*[(str(p.relative_to(participant_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def _stored_calibration(plan: IngestPlan, config: IngestConfig) -> tuple[dict | None, dict | None]:
    if plan.calibration is None:
        return None, None
    calibrated_for = config.calibration_size or plan.source_size
    intrinsics = {s: intrinsics_for_size(plan.calibration.intrinsics[s], calibrated_for, plan.size) for s in plan.serials}
    world_2_cam = {s: plan.calibration.world_2_cam[s] for s in plan.serials}
    return intrinsics, world_2_cam


def _read_plate(path: Path, size: tuple[int, int], source_size: tuple[int, int], serial: str,
                warnings: list[str]) -> np.ndarray | None:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        warnings.append(f"{path}: background plate of camera {serial} cannot be read; skipped")
        return None
    height, width = image.shape[:2]
    if (width, height) != source_size:
        if abs(width / height - source_size[0] / source_size[1]) > 0.01:
            warnings.append(f"{path}: background plate of camera {serial} is {width}x{height}, the video is "
                            f"{source_size[0]}x{source_size[1]} with another aspect ratio; skipped")
            return None
        warnings.append(f"{path}: background plate of camera {serial} is {width}x{height}, resized to the video's size")
    if (width, height) != size:
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass
class _CameraResult:
    serial: str
    frames: int = 0
    plate: bool = False
    seconds: float = 0.0
    error: str | None = None


def _write_plate(store: CaptureStore, index: int, plan: IngestPlan) -> bool:
    """The camera's background plate, colour-corrected, into its chunk; False when it has none (or it is unusable)."""
    serial = plan.serials[index]
    plate_path = plan.raw.backgrounds.get(serial)
    if plate_path is None:
        return False
    plate = _read_plate(plate_path, plan.size, plan.source_size, serial, plan.warnings)
    if plate is None:
        return False
    matrix = plan.color_matrices.get(serial)
    plate = apply_color_correction(plate, matrix) if matrix is not None else plate
    store.chunk_writer("backgrounds").write((index, 0, 0, 0), np.ascontiguousarray(plate)[np.newaxis])
    return True


def _decode_camera(store: CaptureStore, index: int, plan: IngestPlan, config: IngestConfig, stop: threading.Event,
                   progress: ProgressCallback | None) -> _CameraResult:
    serial = plan.serials[index]
    result = _CameraResult(serial)
    started = time.perf_counter()
    path = plan.raw.videos[serial]
    size = plan.size if plan.size != plan.source_size else None
    matrix = plan.color_matrices.get(serial)
    # One frame is one chunk: each is encoded in this thread and written at zarr's key as it arrives, so a
    # worker holds one frame and zarr's per-chunk machinery (several times the cost of zstd) is skipped.
    writer = store.chunk_writer("frames")
    try:
        result.plate = _write_plate(store, index, plan)  # in the worker: plates decode in parallel too
        frames = iter_frames(path, start=config.start, count=config.count, stride=config.stride, size=size,
                             threads=config.decoder_threads, info=plan.videos[serial])
        for t, frame in enumerate(frames):
            if stop.is_set():
                frames.close()
                result.error = "stopped because another camera failed"
                break
            if t >= plan.capacity:
                frames.close()
                raise VideoError(f"{path}: camera {serial} has more frames than its container's duration announces")
            if matrix is not None:
                frame = apply_color_correction(frame, matrix)
            writer.write((index, t, 0, 0, 0), frame[np.newaxis, np.newaxis])
            result.frames += 1
            if progress and (result.frames % PROGRESS_EVERY == 0):
                progress(serial, result.frames)
        if progress and result.frames % PROGRESS_EVERY:
            progress(serial, result.frames)
    except (VideoError, OSError) as error:
        result.error = f"camera {serial}: {error}"
        stop.set()
    result.seconds = time.perf_counter() - started
    return result


def ingest_sequence(sequence_dir: str | Path, work_root: str, config: IngestConfig | None = None,
                    progress: ProgressCallback | None = None) -> dict:
    """Ingest one raw sequence into ``<work_root>/<PID>/<SEQ>/capture.zarr``; returns the stage report.

    Ingest makes the store the other stages open, so it takes only the skeleton's skip check and record: its
    input digest is the raw files', and a stale store is recreated, not opened.
    """
    config = config or IngestConfig()
    raw = discover_sequence(sequence_dir)
    work = SequenceWorkDir.for_sequence(work_root, raw.participant, raw.sequence)
    plan = plan_ingest(raw, config)
    chash, digest = config_hash(config.result_fields()), input_digest(plan)
    with sequence_lock(work.uri, timeout=config.lock_timeout, create=True):  # ingest makes the folder
        skipped = _skipped(work.capture_uri, chash, digest, plan.warnings)
        if skipped is not None:
            return skipped
        return _run_ingest(plan, config, work, chash, digest, progress)


def _skipped(uri: str, chash: str, digest: str, warnings: list[str]) -> dict | None:
    """The skipped report if this very ingest finished there and nothing of it is missing; None means rebuild.

    An interrupted rebuild, a damaged capture store or a missing chunk all mean rebuild (said in ``warnings``);
    a zarr node that is not a capture store is someone else's data, so it is refused rather than deleted.
    """
    if rewrite_interrupted(uri):
        warnings.append(f"{uri}: the last ingest of this store did not finish; rebuilt")
        return None
    if not CaptureStore.exists(uri):
        return None
    try:
        store = CaptureStore.open(uri, mode="r")
    except CaptureStoreError as error:
        if CaptureStore.is_ours(uri):
            warnings.append(f"rebuilt a damaged store ({error})")
            return None
        raise CaptureStoreError(f"{uri} holds zarr data that is not a capture store; ingest will not overwrite "
                                f"it: move or delete it, then run ingest again") from None
    if store.attrs.get("dropped_arrays"):  # the archive dropped its arrays after export: ingest again
        warnings.append(f"{uri}: its arrays were dropped after export; ingesting again")
        return None
    skipped = skipped_report(store, STAGE, chash, digest)
    note = rerun_note(store, STAGE, chash, digest) if skipped is None else None
    if note:
        warnings.append(note)
    return skipped


def _run_ingest(plan: IngestPlan, config: IngestConfig, work: SequenceWorkDir, chash: str, digest: str,
                progress: ProgressCallback | None) -> dict:
    """Create the store, decode every camera into it, trim it to the common length, then report and record."""
    store = _create_store(plan, config, work)
    workers = config.workers or min(len(plan.serials), os.cpu_count() or 1)
    started = time.perf_counter()
    results = _decode_cameras(store, plan, config, workers, progress)
    wall = time.perf_counter() - started
    # Which cameras have a plate: a listed plate whose chunk goes missing is damage, not "no plate".
    store.set_attr("background_cameras", [r.serial for r in results if r.plate])
    counts = _common_length(store, plan, config, work, results)
    report = _report(store, plan, config, work, counts, wall, workers, chash)
    report = StageRun(STAGE, VERSION, store, work, chash, digest).finish(report)
    store.seal()  # after the record: a run killed before this line is rebuilt by the next one
    return report


def _create_store(plan: IngestPlan, config: IngestConfig, work: SequenceWorkDir) -> CaptureStore:
    """A fresh store sized for the plan, with its calibration (the workers write frames and plates)."""
    intrinsics, world_2_cam = _stored_calibration(plan, config)
    source_fps = next(iter(plan.videos.values())).fps
    store = CaptureStore.rebuild(
        work.capture_uri, cameras=plan.serials, n_frames=plan.capacity, height=plan.size[1], width=plan.size[0],
        fps=source_fps / config.stride, frame_indices=[config.start + i * config.stride for i in range(plan.capacity)],
        intrinsics=intrinsics, world_2_cam=world_2_cam, codec=config.codec,
    )
    # Where the frames came from: later stages find files that sit beside the videos (a synthetic capture's
    # ground_truth.zarr) without being told.
    store.set_attr("source_sequence_dir", str(Path(plan.raw.sequence_dir).resolve()))
    without = [serial for serial in plan.serials if serial not in plan.raw.backgrounds]
    if without:  # one line for the rig; the report lists the cameras
        plan.warnings.append(f"no background plates for {len(without)}/{len(plan.serials)} cameras "
                             "(sequences/BACKGROUND/image_<SERIAL>.jpg): matting will use rembg for them")
    return store


def _decode_cameras(store: CaptureStore, plan: IngestPlan, config: IngestConfig, workers: int,
                    progress: ProgressCallback | None) -> list[_CameraResult]:
    """Every camera decoded by its own worker; the first failure stops the others at a frame boundary."""
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        futures = [pool.submit(_decode_camera, store, i, plan, config, stop, progress) for i in range(len(plan.serials))]
        return [future.result() for future in futures]


def _common_length(store: CaptureStore, plan: IngestPlan, config: IngestConfig, work: SequenceWorkDir,
                   results: list[_CameraResult]) -> dict[str, int]:
    """Frames decoded per camera, the store trimmed to the shortest; a failed camera writes a failed report."""
    failures = [r.error for r in results if r.error and not r.error.startswith("stopped")]
    if failures:
        report = {"stage": STAGE, "status": Status.FAILED, "errors": failures, "warnings": plan.warnings}
        work.write_report(STAGE, report)
        raise IngestError(f"ingest failed ({failures[0]}); the store is not marked complete"
                          + "".join(f"\n  {failure}" for failure in failures[1:]))

    counts = {r.serial: r.frames for r in results}
    n_frames = min(counts.values())
    if n_frames == 0:
        raise IngestError(f"{plan.raw.sequence_dir}: no frames in the selected range (start={config.start}, "
                          f"stride={config.stride}); every camera decoded 0 frames")
    if len(set(counts.values())) > 1:
        plan.warnings.append("cameras differ in length (" + ", ".join(f"{s}: {n}" for s, n in counts.items())
                             + f"); the common length {n_frames} is used")
    store.set_frame_count(n_frames)
    return counts


def _report(store: CaptureStore, plan: IngestPlan, config: IngestConfig, work: SequenceWorkDir,
            counts: dict[str, int], wall: float, workers: int, chash: str) -> dict:
    decoded = sum(counts.values())
    megabytes = decoded * plan.size[0] * plan.size[1] * 3 / 1e6
    return {
        "stage": STAGE,
        "status": Status.COMPLETED,
        "participant": plan.raw.participant,
        "sequence": plan.raw.sequence,
        "store": work.capture_uri,
        "cameras": plan.serials,
        "frames": min(counts.values()),
        "frame_indices": store.frame_indices,
        "frames_per_camera_decoded": counts,
        "size": list(plan.size),
        "source_size": list(plan.source_size),
        "fps": store.fps,
        "source_fps": next(iter(plan.videos.values())).fps,
        "calibrated": plan.calibration is not None,
        "color_corrected": bool(plan.color_matrices),
        "background_plates": sum(1 for s in plan.serials if s in plan.raw.backgrounds),
        "cameras_without_plate": [s for s in plan.serials if s not in plan.raw.backgrounds],
        "decode_seconds": round(wall, 3),
        "frames_per_second": round(decoded / wall, 2) if wall else None,
        "megabytes_per_second": round(megabytes / wall, 2) if wall else None,
        "workers": workers,
        "codec": config.codec,
        "warnings": plan.warnings,
        "config": config.model_dump(),
        "config_hash": chash,
    }
