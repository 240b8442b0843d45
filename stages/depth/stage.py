"""Depth: the store's ``depth`` (C, T, H, W float32 z-depth in metres, 0 = invalid) from multi-view stereo.

NeRSemble's depth losses only help where the target depth is right, so this stage prefers a hole to a
guess: every depth is found by matching against neighbouring views inside the mattes' visual hull, and is
kept only where at least ``min_consistent_views`` other views' depth maps put the surface at the same place
and the matte says subject.

Work goes timestep by timestep: all cameras' frames and mattes of one timestep are read, the hull is carved,
every view is matched (views in parallel), the consistency filter compares the raw maps, and each camera's
(camera, t) chunk is written by this one writer. Memory stays at one timestep's frames and maps however
long the sequence. The torch plane sweep is the default on CPU and CUDA; where pycolmap is a CUDA build,
COLMAP PatchMatch stereo (with its own geometric filtering) does the matching instead.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np
import torch

from stages.depth.config import DepthConfig
from stages.core.errors import PipelineError, StageOrderError
from stages.core.bookkeeping import PRODUCED_BY
from stages.core.skeleton import Decision, StageRun, run_stage
from stages.core.status import Status
from stages.depth.colmap import PatchMatchSettings, colmap_has_cuda, patch_match_timestep, require_colmap
from stages.depth.consistency import filter_consistent
from stages.geometry.views import Views, angles_between_axes, make_views, rig_centre, sees_point
from stages.geometry.hull import Hull, depth_bounds, visual_hull
from stages.geometry.holdout import HoldoutSet, digest_part, record_holdout, resolve_holdout
from stages.depth.sweep import SweepSettings, build_pyramid, sweep_view, to_grey
from stages.core.devices import resolve_device, torch_threads
from storage import CaptureStore, SequenceWorkDir

STAGE = "depth"
VERSION = "1"
PREVIEW_PATH = "export/previews/depth.png"
PREVIEW_MIN_CELL, PREVIEW_MAX_CELL = 240, 400  # px: a preview cell's height, so small and huge captures both read

ProgressCallback = Callable[[int, int], None]  # (timesteps done, timesteps in all)


# --- choices made before anything is written ------------------------------------------------------------------


def resolve_method(method: str) -> str:
    """``auto`` -> colmap where pycolmap can run PatchMatch (CUDA build), else the torch sweep."""
    if method == "auto":
        return "colmap" if colmap_has_cuda() else "sweep"
    if method == "colmap":
        require_colmap()
    return method


# Measured at 802x550 (16 cameras, peak RSS with 1 and 2 workers, benchmarks/EXPERIMENTS.md): a timestep's frames,
# mattes and pyramids take ~20 uint8 frames per camera, and each worker ~100 more. Scaled by the frame size, this
# keeps the stage inside 4 GB at 1604x1100 on any number of cores (imports and torch take the rest).
TIMESTEP_FRAMES_PER_CAMERA = 20
WORKER_FRAMES = 100
MEMORY_BUDGET = 7 << 29  # 3.5 GiB


def worker_count(config: DepthConfig, device: torch.device, cameras: int, height: int, width: int) -> int:
    """Views matched at once: one on a GPU (it is already parallel); on a CPU one per core, as far as the memory
    budget allows (the cores left over go to each worker's torch threads)."""
    if config.workers:
        return min(config.workers, cameras)
    if device.type == "cuda":
        return 1
    frame = height * width * 3
    by_memory = (MEMORY_BUDGET - cameras * TIMESTEP_FRAMES_PER_CAMERA * frame) // (WORKER_FRAMES * frame)
    return max(1, min(os.cpu_count() or 1, cameras, by_memory))


def worker_threads(device: torch.device, workers: int) -> int:
    """torch threads per worker: the cores shared out on a CPU (1 each at one worker per core)."""
    if device.type != "cpu" or workers <= 1:
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // workers)


def sweep_settings(config: DepthConfig) -> SweepSettings:
    """The config's sweep values as a plain record (the sweep module does not depend on pydantic)."""
    return SweepSettings(window=config.window, best_k=config.best_k, min_ncc=config.min_ncc,
                         min_texture=config.min_texture, max_step_px=config.max_step_px,
                         min_planes=config.min_planes, max_planes=config.max_planes, coarse_size=config.coarse_size,
                         refine_steps=config.refine_steps, volume_mb=config.volume_mb)


def load_views(store: CaptureStore, device: torch.device, serials: list[str] | None = None) -> Views:
    """The store's cameras (or ``serials`` of them), or a clear error when the calibration is missing."""
    intrinsics, world_2_cam = store.intrinsics, store.world_2_cam
    if intrinsics is None or world_2_cam is None:
        raise StageOrderError(f"{store.uri}: the depth stage needs every camera's K and world_2_cam, and the store "
                              f"has none: run `{PRODUCED_BY['calibrate']}`")
    return make_views(store.cameras if serials is None else serials, intrinsics, world_2_cam, store.width,
                      store.height, device)


def choose_sources(views: Views, count: int, max_angle: float) -> dict[int, list[int]]:
    """Per camera, the ``count`` cameras with the closest viewing directions that also see the rig's centre.

    A small angle means similar appearance and little occlusion between the two views, which is what
    window matching needs; a camera that cannot see the subject would only add noise.
    """
    angles = angles_between_axes(views)
    centre = rig_centre(views)
    seeing = [sees_point(views, index, centre) for index in range(views.count)]
    sources: dict[int, list[int]] = {}
    for ref in range(views.count):
        order = [int(i) for i in np.argsort(angles[ref], kind="stable") if i != ref]
        usable = [i for i in order if angles[ref, i] <= max_angle and seeing[i]] if seeing[ref] else []
        sources[ref] = usable[:count]
    return sources


@dataclass
class DepthPlan:
    """What is decided before anything is written, so a bad option fails without touching the store."""

    method: str
    device: torch.device
    views: Views  # the training cameras only: hold-out views are neither references nor sources
    sources: dict[int, list[int]]
    workers: int
    holdout: HoldoutSet
    indices: list[int]  # store camera index of each view
    warnings: list[str] = field(default_factory=list)


def plan_depth(store: CaptureStore, config: DepthConfig) -> DepthPlan:
    """Everything decided from the calibration alone: method, device, hold-out set, each view's sources."""
    method = resolve_method(config.method)
    device = resolve_device(config.device, STAGE) if method == "sweep" else torch.device("cpu")
    load_views(store, device)  # the calibration must be there before the hold-out set can be chosen
    holdout = resolve_holdout(store, config.holdout, STAGE)
    train = holdout.train(store.cameras)
    views = load_views(store, device, train)
    sources = choose_sources(views, config.neighbours, config.max_neighbour_angle)
    warnings = [f"camera {views.serials[ref]}: no neighbouring camera within {config.max_neighbour_angle:g} deg "
                "sees the subject; its depth maps are all invalid" for ref, srcs in sources.items() if not srcs]
    workers = worker_count(config, device, views.count, store.height, store.width)
    return DepthPlan(method, device, views, sources, workers, holdout, [store.camera_index(s) for s in train],
                     warnings)


# --- the stage --------------------------------------------------------------------------------------------------


def depth_sequence(sequence_work_dir: str | os.PathLike[str], config: DepthConfig | None = None,
                   progress: ProgressCallback | None = None) -> dict:
    """Fill the depth maps of one sequence (``<work>/<PID>/<SEQ>``); returns the stage report.

    Needs the ingest, calibrate and matte records; skipped when its own record matches this config and those
    upstream records.
    """
    config = config or DepthConfig()

    def decide(store: CaptureStore) -> Decision[DepthPlan]:
        plan = plan_depth(store, config)
        hashed = {k: v for k, v in config.result_fields().items() if k != "holdout"}  # the set goes in the digest
        return Decision(plan, {**hashed, "method": plan.method}, extra=digest_part(plan.holdout.cameras),
                        record_choice=lambda store: record_holdout(store, plan.holdout))

    return run_stage(SequenceWorkDir(sequence_work_dir), STAGE, VERSION, config.lock_timeout, decide,
                     lambda run, plan: _run(run, config, plan, progress))


@dataclass
class _Tally:
    """Running per-camera counts and timings, summed over timesteps for the report."""

    cameras: int
    foreground: np.ndarray = field(init=False)
    raw: np.ndarray = field(init=False)
    valid: np.ndarray = field(init=False)
    planes: np.ndarray = field(init=False)
    depth_min: np.ndarray = field(init=False)
    depth_max: np.ndarray = field(init=False)
    seconds: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "hull": 0.0, "match": 0.0,
                                                                "filter": 0.0, "write": 0.0})
    match_seconds_per_view: list[float] = field(default_factory=list)
    empty_hulls: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.foreground = np.zeros(self.cameras, np.int64)
        self.raw = np.zeros(self.cameras, np.int64)
        self.valid = np.zeros(self.cameras, np.int64)
        self.planes = np.zeros(self.cameras, np.int64)
        self.depth_min = np.full(self.cameras, np.inf)
        self.depth_max = np.zeros(self.cameras)

    def add(self, masks: np.ndarray, raw: np.ndarray, depth: np.ndarray) -> None:
        self.foreground += masks.reshape(self.cameras, -1).sum(1)
        self.raw += (raw > 0).reshape(self.cameras, -1).sum(1)
        self.valid += (depth > 0).reshape(self.cameras, -1).sum(1)
        for index in range(self.cameras):
            found = depth[index][depth[index] > 0]
            if found.size:
                self.depth_min[index] = min(self.depth_min[index], float(found.min()))
                self.depth_max[index] = max(self.depth_max[index], float(found.max()))


def _run(run: StageRun, config: DepthConfig, plan: DepthPlan, progress: ProgressCallback | None) -> dict:
    store, work = run.store, run.work
    tally = _Tally(plan.views.count)
    started = time.perf_counter()
    threads = worker_threads(plan.device, plan.workers)
    with torch_threads(threads), ThreadPoolExecutor(max_workers=plan.workers, thread_name_prefix="depth") as pool:
        for t in range(store.n_frames):
            _depth_timestep(store, t, config, plan, pool, tally)
            if progress:
                progress(t + 1, store.n_frames)
    wall = time.perf_counter() - started
    preview = write_preview(store, work, config, plan.indices)
    report = _report(store, work, config, plan, tally, wall, preview, run.config_hash)
    return run.finish(report)


def _depth_timestep(store: CaptureStore, t: int, config: DepthConfig, plan: DepthPlan, pool: ThreadPoolExecutor,
                   tally: _Tally) -> None:
    """Match every view of timestep ``t``, filter by consistency and matte, write each camera's chunk."""
    clock = time.perf_counter()
    frames = np.stack([store.read_frame(c, t) for c in plan.indices])  # never a hold-out camera's
    alpha = np.stack([store.read_alpha(c, t) for c in plan.indices])
    masks = alpha >= config.matte_threshold
    tally.seconds["read"] += time.perf_counter() - clock

    clock = time.perf_counter()
    hull = visual_hull(plan.views, masks, config.hull_resolution, config.hull_misses, config.hull_dilation_px)
    tally.seconds["hull"] += time.perf_counter() - clock
    if hull.empty:
        tally.empty_hulls.append(t)

    clock = time.perf_counter()
    if hull.empty:
        raw = np.zeros(alpha.shape, np.float32)
    elif plan.method == "colmap":
        raw = _colmap_raw(plan, frames, hull, config)
    else:
        raw = _sweep_raw(plan, frames, alpha, hull, config, pool, tally)
    raw = np.where(masks, raw, 0).astype(np.float32)
    tally.seconds["match"] += time.perf_counter() - clock

    clock = time.perf_counter()
    if plan.method == "sweep" and config.min_consistent_views > 0:
        depth = filter_consistent(plan.views, torch.as_tensor(raw, device=plan.device),
                                  config.consistency_tolerance, config.min_consistent_views).cpu().numpy()
    else:  # COLMAP's geometric maps are filtered by COLMAP already
        depth = raw
    tally.seconds["filter"] += time.perf_counter() - clock

    clock = time.perf_counter()
    for index, camera in enumerate(plan.indices):
        store.write_depth(camera, t, depth[index])
    for camera in sorted(set(range(store.n_cameras)) - set(plan.indices)):  # hold-out views: no depth, ever
        store.write_depth(camera, t, np.zeros((store.height, store.width), np.float32))
    tally.seconds["write"] += time.perf_counter() - clock
    tally.add(masks, raw, depth)


def _sweep_raw(plan: DepthPlan, frames: np.ndarray, alpha: np.ndarray, hull: Hull, config: DepthConfig,
               pool: ThreadPoolExecutor, tally: _Tally) -> np.ndarray:
    """(C, H, W) unfiltered depth of every view, views matched in parallel."""
    device = plan.device
    greys = to_grey(frames, device)
    mattes = torch.as_tensor(alpha, device=device).float() / 255.0
    pyramid = build_pyramid(plan.views, greys, mattes, config.coarse_size)
    settings = sweep_settings(config)

    def one_view(ref: int) -> tuple[int, np.ndarray, int, float]:
        clock = time.perf_counter()
        result = sweep_view(pyramid, ref, plan.sources[ref], hull, settings)
        return ref, result.depth.cpu().numpy(), result.planes, time.perf_counter() - clock

    raw = np.zeros(alpha.shape, np.float32)
    for ref, depth, planes, seconds in pool.map(one_view, range(plan.views.count)):
        raw[ref] = depth
        tally.planes[ref] = max(tally.planes[ref], planes)
        tally.match_seconds_per_view.append(seconds)
    return raw


def _colmap_raw(plan: DepthPlan, frames: np.ndarray, hull: Hull, config: DepthConfig) -> np.ndarray:
    """(C, H, W) COLMAP geometric depth maps, searched within the hull's depth range over all views."""
    near, far = np.inf, 0.0
    for index in range(plan.views.count):
        lo, hi = depth_bounds(plan.views, index, hull)
        if bool((lo > 0).any()):
            near, far = min(near, float(lo[lo > 0].min())), max(far, float(hi.max()))
    settings = PatchMatchSettings(window=config.window, min_consistent_views=config.min_consistent_views,
                                  min_ncc=max(config.min_ncc, 0.0), depth_min=near, depth_max=far)
    return patch_match_timestep(plan.views, frames, plan.sources, settings)


# --- preview and report -----------------------------------------------------------------------------------------


def colourise(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(H, W, 3) RGB: near is warm, far is cool (turbo), invalid is black."""
    valid = depth > 0
    scaled = np.clip((hi - depth) / max(hi - lo, 1e-6), 0, 1)
    bgr = cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)
    bgr[~valid] = 0
    return bgr[..., ::-1]


def _spread(count: int, wanted: int) -> list[int]:
    if count <= wanted:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, wanted)})


def _label(image: np.ndarray, text: str) -> np.ndarray:
    strip = np.full((16, image.shape[1], 3), 24, np.uint8)
    cv2.putText(strip, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (230, 230, 230), 1, cv2.LINE_AA)
    return np.concatenate([strip, image], axis=0)


def preview_sheet(store: CaptureStore, cameras: list[int], t: int) -> np.ndarray:
    """(H, W, 3) RGB: per camera, the frame over its colour-mapped depth, one shared depth scale."""
    depths = [store.read_depth(c, t) for c in cameras]
    found = np.concatenate([d[d > 0] for d in depths] + [np.zeros(0, np.float32)])
    lo, hi = (float(np.percentile(found, 1)), float(np.percentile(found, 99))) if found.size else (0.0, 1.0)
    scale = min(PREVIEW_MAX_CELL, max(PREVIEW_MIN_CELL, store.height)) / store.height
    size = (max(1, round(store.width * scale)), max(1, round(store.height * scale)))
    columns = []
    for c, depth in zip(cameras, depths):
        frame = cv2.resize(store.read_frame(c, t), size, interpolation=cv2.INTER_AREA)
        colours = cv2.resize(colourise(depth, lo, hi), size, interpolation=cv2.INTER_NEAREST)
        columns.append(_label(np.concatenate([frame, colours], axis=0), f"{store.cameras[c]} t={t}"))
        columns.append(np.full((columns[-1].shape[0], 4, 3), 40, np.uint8))
    sheet = np.concatenate(columns[:-1], axis=1)
    return _label(sheet, f"depth {lo:.3f} m (red) .. {hi:.3f} m (blue), black = invalid")


def write_preview(store: CaptureStore, work: SequenceWorkDir, config: DepthConfig, cameras: list[int]) -> str:
    """The preview of the given (training) cameras."""
    chosen = [cameras[i] for i in _spread(len(cameras), config.preview_cameras)]
    sheet = preview_sheet(store, chosen, store.n_frames // 2)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(sheet[..., ::-1]))
    if not ok:
        raise PipelineError("could not encode the depth preview as PNG")
    return work.write_bytes(PREVIEW_PATH, data.tobytes())


def _report(store: CaptureStore, work: SequenceWorkDir, config: DepthConfig, plan: DepthPlan, tally: _Tally,
            wall: float, preview: str, chash: str) -> dict:
    serials = plan.views.serials
    views = plan.views.count * store.n_frames
    warnings = list(plan.warnings)
    warnings += [f"t={t}: the mattes' visual hull is empty (check calibration and mattes); no depth"
                 for t in tally.empty_hulls]
    warnings += [f"camera {serials[i]}: no valid depth in any frame" for i in range(plan.views.count)
                 if plan.sources[i] and tally.valid[i] == 0 and not tally.empty_hulls]

    def fraction(counts: np.ndarray, index: int | None = None) -> float | None:
        total = tally.foreground.sum() if index is None else tally.foreground[index]
        value = counts.sum() if index is None else counts[index]
        return round(float(value / total), 4) if total else None

    cameras = {serials[i]: {
        "sources": [serials[s] for s in plan.sources[i]],
        "coverage": fraction(tally.valid, i),
        "raw_coverage": fraction(tally.raw, i),
        "planes": int(tally.planes[i]),
        "depth_range_m": ([round(float(tally.depth_min[i]), 4), round(float(tally.depth_max[i]), 4)]
                          if tally.valid[i] else None),
    } for i in range(plan.views.count)}
    return {
        "stage": STAGE,
        "status": Status.COMPLETED,
        "store": work.capture_uri,
        "method": plan.method,
        "device": str(plan.device),
        "workers": plan.workers,
        "frames": store.n_frames,
        "size": [store.width, store.height],
        "coverage": fraction(tally.valid),
        "raw_coverage": fraction(tally.raw),
        "cameras": cameras,
        "holdout": plan.holdout.to_json(),  # no depth for these: they were neither references nor sources
        "seconds": round(wall, 3),
        "seconds_per_view": round(wall / views, 4) if views else None,
        "match_seconds_per_view": (round(float(np.mean(tally.match_seconds_per_view)), 4)
                                   if tally.match_seconds_per_view else None),
        "timings_s": {name: round(seconds, 3) for name, seconds in tally.seconds.items()},
        "preview": preview,
        "warnings": warnings,
        "config": config.model_dump(),
        "config_hash": chash,
    }
