"""Calibrate: every camera's K and world_2_cam, from the rig's json, from the frames (COLMAP), or both.

Modes
- ``provided``: the calibration ingest took from camera_params.json (K already rescaled to the stored size).
- ``colmap``: estimate every camera from the frames (SIFT, matching, incremental mapping, global BA). A camera
  pools the features of several timesteps (see :mod:`stages.calibrate.colmap`). The result is moved into the
  provided calibration's frame by a similarity fitted on the camera centres and orientations, or, without one,
  into a metric frame set by the known camera-to-subject distance and centred on the subject. By default
  (``--focal auto``) the provided K is kept and only extrinsics are estimated: with the rig's narrow-field
  cameras focal length and distance are nearly interchangeable, and estimating both costs ~0.1 deg and ~7 mm
  (see benchmarks/calibrate.py). Without a provided K, focal lengths are estimated (one per camera, or one
  shared with ``--shared-intrinsics``); the principal point stays at the provided one or the image centre.
- ``refine``: start from the provided calibration, triangulate with its poses, bundle-adjust the extrinsics
  (and focal lengths on request), align back to the provided frame and report how far each camera moved.

The provided calibration is kept in the store attr ``provided_calibration`` the first time this stage runs on
a store (ingest recreates the store, so a new ingest means a new copy). ``colmap`` and ``refine`` compare
against it and fall back to it; ``provided`` restores it after an estimate replaced it.

An estimate is written only if every camera registered and passes the sanity checks (reprojection error,
observations, focal length, cheirality, agreement with the provided calibration). Otherwise the stage falls
back to the provided calibration (status ``fallback``, the failing cameras named in the report) or, without
one, raises :class:`CalibrationError` after writing a ``failed`` report. A wrong calibration is never written.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stages.calibrate.config import CalibrateConfig
from stages.core.errors import CalibrationError, PipelineError
from stages.calibrate import colmap
from stages.calibrate import export
from stages.core.bookkeeping import require_stage
from stages.core.skeleton import Decision, StageRun, run_stage
from stages.core.status import Status
from stages.calibrate.geometry import (
    align_to,
    focal_problem,
    geometry_problems,
    metric_frame,
    pose_differences,
    summarize,
)
from storage import CaptureStore, SequenceWorkDir, StorageError

if TYPE_CHECKING:
    import pycolmap

STAGE = "calibrate"
VERSION = "1"
PROVIDED_ATTR = "provided_calibration"
FIRST_PASS_ERROR_PX = 10.0  # refine: triangulation tolerance while the provided poses may still be a little off


@dataclass
class Calibration:
    """K (stored frame size) and world_2_cam per camera serial."""

    intrinsics: dict[str, np.ndarray]
    world_2_cam: dict[str, np.ndarray]


@dataclass
class Estimate:
    """What ``colmap`` or ``refine`` produced, in the final world frame, and what is wrong with it."""

    calibration: Calibration
    reconstruction: pycolmap.Reconstruction | None  # moved into the final world frame
    cameras: dict[str, dict]  # per camera: registered, statistics, errors
    problems: dict[str, list[str]]
    summary: dict = field(default_factory=dict)

    @property
    def failed_cameras(self) -> list[str]:
        return sorted(serial for serial, problems in self.problems.items() if problems)


# --- the provided calibration ---------------------------------------------------------------------------


def provided_calibration(store: CaptureStore) -> Calibration | None:
    """The calibration ingest stored, kept aside on first use so that estimates can be compared and undone."""
    store.refresh()
    attrs = store.attrs
    if PROVIDED_ATTR not in attrs:
        snapshot = {"intrinsics": attrs.get("intrinsics"), "world_2_cam": attrs.get("world_2_cam")}
        store.set_attr(PROVIDED_ATTR, snapshot)
        attrs = store.attrs
    kept = attrs[PROVIDED_ATTR] or {}
    if kept.get("intrinsics") is None or kept.get("world_2_cam") is None:
        return None
    return Calibration(_as_arrays(kept["intrinsics"]), _as_arrays(kept["world_2_cam"]))


def _as_arrays(matrices: dict) -> dict[str, np.ndarray]:
    return {str(serial): np.asarray(value, dtype=np.float64) for serial, value in matrices.items()}


def resolve_mode(requested: str, provided: Calibration | None, store: CaptureStore) -> str:
    """``auto`` means provided when there is one; provided and refine need one."""
    if requested == "auto":
        return "provided" if provided is not None else "colmap"
    if requested in ("provided", "refine") and provided is None:
        raise CalibrationError(f"{store.uri}: --mode {requested} needs the rig's camera_params.json, but ingest "
                               "found none; use --mode colmap to estimate the cameras from the frames")
    return requested


def select_timesteps(n_frames: int, count: int) -> list[int]:
    """``count`` timesteps spread evenly over the sequence (the head moves, so spread means new features)."""
    return sorted({int(t) for t in np.round(np.linspace(0, n_frames - 1, min(count, n_frames)))})


def camera_setup(cameras: list[str], provided: Calibration | None, size: tuple[int, int], config: CalibrateConfig,
                 warnings: list[str]) -> colmap.CameraSetup:
    """Starting K per camera and whether focal lengths move, from the config and the provided calibration."""
    if config.focal == "fixed" and provided is None:
        raise CalibrationError("--focal fixed needs a provided calibration to take the focal lengths from")
    refine = config.focal == "refine" or (config.focal == "auto" and (provided is None or config.shared_intrinsics))
    if provided is not None:
        start = {s: provided.intrinsics[s].copy() for s in cameras}
    else:
        f = config.focal_guess * max(size)
        start = {s: np.array([[f, 0.0, size[0] / 2], [0.0, f, size[1] / 2], [0.0, 0.0, 1.0]]) for s in cameras}
    if config.shared_intrinsics:
        shared = np.median(np.stack([start[s] for s in cameras]), axis=0)
        shared[0, 1] = 0.0
        start = {s: shared.copy() for s in cameras}
    skewed = [s for s in cameras if abs(start[s][0, 1]) > 1e-9]
    if skewed:
        warnings.append(f"camera(s) {', '.join(skewed)} have a skewed K; COLMAP models no skew, it is dropped")
    if refine:
        uneven = [s for s in cameras if abs(start[s][0, 0] / start[s][1, 1] - 1.0) > 0.005]
        if uneven:
            warnings.append(f"camera(s) {', '.join(uneven)} have fx != fy; with refined focal lengths they get one "
                            "focal length (SIMPLE_PINHOLE), to avoid the degenerate fx/fy refinement")
    return colmap.CameraSetup(intrinsics=start, refine_focal=refine, shared=config.shared_intrinsics,
                              has_prior=provided is not None)


# --- estimating -----------------------------------------------------------------------------------------


def _features(store: CaptureStore, root: Path, setup: colmap.CameraSetup, config: CalibrateConfig,
              threads: int, timer: colmap.Timer) -> tuple[colmap.Workspace, colmap.MergedFeatures]:
    """Export, extract, match per timestep, pool per camera, verify per camera pair."""
    workspace = colmap.Workspace(root=root, cameras=store.cameras,
                                 timesteps=select_timesteps(store.n_frames, config.timesteps),
                                 use_masks=config.use_masks)
    size = (store.width, store.height)
    with timer.phase("export"):
        colmap.export_frames(store, workspace)
    with timer.phase("extract"):
        colmap.extract_features(workspace, threads, config.max_features)
    with timer.phase("match"):
        colmap.match_same_timestep(workspace, threads)
        merged = colmap.merge_timesteps(workspace, setup, size)
    with timer.phase("verify"):
        colmap.verify_pairs(workspace, merged, threads, config.min_inliers, config.seed)
    return workspace, merged


def _camera_entries(cameras: list[str], merged: colmap.MergedFeatures, statistics: dict[str, dict],
                    intrinsics: dict[str, np.ndarray]) -> dict[str, dict]:
    entries = {}
    for serial in cameras:
        stats = statistics.get(serial, {})
        entries[serial] = {
            "registered": serial in statistics,
            "keypoints": merged.keypoints.get(serial, 0),
            "verified_matches": sum(n for pair, n in merged.pair_inliers.items() if serial in pair.split("-")),
            "observations": stats.get("observations"),
            "reprojection_error_mean_px": stats.get("reprojection_error_mean_px"),
            "reprojection_error_median_px": stats.get("reprojection_error_median_px"),
            "focal_px": float(intrinsics[serial][0, 0]) if serial in intrinsics else None,
        }
    return entries


def _quality_problems(entries: dict[str, dict], calibration: Calibration, setup: colmap.CameraSetup,
                      provided: Calibration | None, size: tuple[int, int],
                      config: CalibrateConfig) -> dict[str, list[str]]:
    """Per camera, why its estimate cannot be trusted (empty list: it can)."""
    problems: dict[str, list[str]] = {serial: [] for serial in entries}
    for serial, entry in entries.items():
        if not entry["registered"]:
            problems[serial].append(f"not registered ({entry['keypoints']} features, {entry['verified_matches']} "
                                    "verified matches with other cameras)")
            continue
        if (entry["observations"] or 0) < config.min_observations:
            problems[serial].append(f"sees only {entry['observations']} triangulated points "
                                    f"(at least {config.min_observations} needed)")
        median = entry["reprojection_error_median_px"]
        if median is not None and median > config.max_reprojection_error:
            problems[serial].append(f"median reprojection error {median:.2f}px > {config.max_reprojection_error}px")
        expected = float(provided.intrinsics[serial][0, 0]) if provided is not None else None
        if setup.refine_focal:
            issue = focal_problem(entry["focal_px"], expected, size, config.max_focal_deviation)
            if issue:
                problems[serial].append(issue)
    for serial, issues in geometry_problems(calibration.world_2_cam).items():
        problems[serial].extend(issues)
    return problems


def _distance_problems(differences: dict[str, dict], config: CalibrateConfig, what: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for serial, diff in differences.items():
        if diff["rotation_deg"] > config.max_rotation_error_deg or diff["center_mm"] > config.max_center_error_mm:
            out[serial] = [f"{what} by {diff['rotation_deg']:.2f} deg and {diff['center_mm']:.1f} mm (limits "
                           f"{config.max_rotation_error_deg} deg, {config.max_center_error_mm} mm)"]
    return out


def _finish_estimate(reconstruction: pycolmap.Reconstruction | None, store: CaptureStore,
                     merged: colmap.MergedFeatures, setup: colmap.CameraSetup, provided: Calibration | None,
                     config: CalibrateConfig, refine: bool) -> Estimate:
    """Move the model into the final world frame, measure it, and list what is wrong with it."""
    cameras, size = store.cameras, (store.width, store.height)
    _, raw_poses = colmap.camera_poses(reconstruction) if reconstruction is not None else ({}, {})
    summary: dict = {}
    if len(raw_poses) >= 3 or (provided is None and len(raw_poses) >= 2):
        try:
            similarity = align_to(raw_poses, provided.world_2_cam) if provided is not None \
                else metric_frame(raw_poses, config.subject_distance)
            colmap.transform_reconstruction(reconstruction, similarity)
            summary["alignment_scale"] = similarity.scale
        except ValueError as error:
            return _empty_estimate(cameras, merged, f"the registered cameras do not fix a world frame: {error}")
    elif raw_poses:
        return _empty_estimate(cameras, merged, f"only {len(raw_poses)} camera(s) registered; too few to align",
                               registered=set(raw_poses))
    intrinsics, world_2_cam = colmap.camera_poses(reconstruction) if reconstruction is not None else ({}, {})
    statistics = colmap.camera_statistics(reconstruction) if reconstruction is not None else {}
    entries = _camera_entries(cameras, merged, statistics, intrinsics)
    calibration = Calibration(intrinsics, world_2_cam)
    problems = _quality_problems(entries, calibration, setup, provided, size, config)
    if provided is not None and world_2_cam:
        differences = pose_differences(world_2_cam, provided.world_2_cam)
        key_rot, key_centre = ("moved_deg", "moved_mm") if refine else ("rotation_error_deg", "center_error_mm")
        for serial, diff in differences.items():
            entries[serial][key_rot], entries[serial][key_centre] = diff["rotation_deg"], diff["center_mm"]
            entries[serial]["focal_change_px"] = float(intrinsics[serial][0, 0] - provided.intrinsics[serial][0, 0])
        label = "motion" if refine else "against_provided"
        summary[label] = {"rotation_deg": summarize([d["rotation_deg"] for d in differences.values()]),
                          "center_mm": summarize([d["center_mm"] for d in differences.values()])}
        what = "refinement moved it" if refine else "it differs from the provided calibration"
        for serial, issues in _distance_problems(differences, config, what).items():
            problems[serial].extend(issues)
    if reconstruction is not None:
        summary["points"] = int(reconstruction.num_points3D())
        summary["observations"] = int(reconstruction.compute_num_observations())
        summary["reprojection_error_px"] = {"mean": float(reconstruction.compute_mean_reprojection_error())}
        medians = [e["reprojection_error_median_px"] for e in entries.values() if e["reprojection_error_median_px"]]
        summary["reprojection_error_px"]["median_of_cameras"] = float(np.median(medians)) if medians else None
    return Estimate(calibration, reconstruction, entries, problems, summary)


def _empty_estimate(cameras: list[str], merged: colmap.MergedFeatures, reason: str,
                    registered: set[str] = frozenset()) -> Estimate:
    """An estimate that failed as a whole (no model, or too few cameras to place it)."""
    entries = _camera_entries(cameras, merged, {s: {} for s in registered}, {})
    problems = {s: [reason if s in registered else
                    f"not registered ({entries[s]['keypoints']} features, {entries[s]['verified_matches']} verified "
                    f"matches with other cameras): {reason}"] for s in cameras}
    return Estimate(Calibration({}, {}), None, entries, problems, {"failure": reason})


def estimate_colmap(store: CaptureStore, provided: Calibration | None, config: CalibrateConfig, root: Path,
                    threads: int, timer: colmap.Timer, warnings: list[str]) -> Estimate:
    """Structure from motion on the pooled features, then one robust global bundle adjustment."""
    setup = camera_setup(store.cameras, provided, (store.width, store.height), config, warnings)
    workspace, merged = _features(store, root, setup, config, threads, timer)
    with timer.phase("map"):
        reconstruction = colmap.incremental_map(workspace, setup.refine_focal, threads, config.seed,
                                                config.min_inliers)
    if reconstruction is None or reconstruction.num_reg_images() == 0:
        return _empty_estimate(store.cameras, merged, "no camera pair had enough verified matches to start a model")
    with timer.phase("ba"):
        colmap.bundle_adjust(reconstruction, setup.refine_focal, threads)
    return _finish_estimate(reconstruction, store, merged, setup, provided, config, refine=False)


def estimate_refine(store: CaptureStore, provided: Calibration, config: CalibrateConfig, root: Path,
                    threads: int, timer: colmap.Timer, warnings: list[str]) -> Estimate:
    """Triangulate with the provided poses, bundle-adjust, re-triangulate tightly, bundle-adjust again."""
    setup = camera_setup(store.cameras, provided, (store.width, store.height), config, warnings)
    workspace, merged = _features(store, root, setup, config, threads, timer)
    size = (store.width, store.height)
    poses = provided.world_2_cam
    for error_px in (FIRST_PASS_ERROR_PX, 4.0):
        with timer.phase("map"):
            start = colmap.reconstruction_with_poses(setup, merged, poses, size)
            if error_px != FIRST_PASS_ERROR_PX:  # keep the refined focal lengths of the first pass
                for camera_id, camera in reconstruction.cameras.items():
                    start.cameras[camera_id].params = camera.params
            reconstruction = colmap.triangulate_known_poses(workspace, start, threads, config.seed, error_px)
        if reconstruction.num_points3D() == 0:
            return _empty_estimate(store.cameras, merged, "no point could be triangulated from the provided poses")
        with timer.phase("ba"):
            colmap.bundle_adjust(reconstruction, setup.refine_focal, threads)
        _, poses = colmap.camera_poses(reconstruction)
    return _finish_estimate(reconstruction, store, merged, setup, provided, config, refine=True)


# --- writing --------------------------------------------------------------------------------------------


def write_outputs(store: CaptureStore, work: SequenceWorkDir, calibration: Calibration,
                  reconstruction: pycolmap.Reconstruction | None, source: str) -> dict[str, str]:
    """The calibration into the store, then the COLMAP text model and transforms.json beside it."""
    size = (store.width, store.height)
    store.set_calibration(calibration.intrinsics, calibration.world_2_cam)
    model = reconstruction if reconstruction is not None else \
        colmap.reconstruction_from_calibration(calibration.intrinsics, calibration.world_2_cam, size)
    model_uri = export.write_colmap_text(work, model)
    payload = export.transforms_json(calibration.intrinsics, calibration.world_2_cam, size, store.frame_indices,
                                     store.fps, source)
    return {"colmap_model": model_uri, "transforms": export.write_transforms(work, payload)}


def _provided_entries(cameras: list[str]) -> dict[str, dict]:
    return {s: {"registered": True, "observations": None, "reprojection_error_mean_px": None,
                "reprojection_error_median_px": None} for s in cameras}


def _failure_message(store: CaptureStore, estimate: Estimate) -> str:
    lines = [f"{serial}: {'; '.join(estimate.problems[serial])}" for serial in estimate.failed_cameras]
    header = f"{store.uri}: the estimated calibration failed its checks for {len(lines)} camera(s):"
    return header + "".join(f"\n  {line}" for line in lines)


@dataclass(frozen=True)
class CalibratePlan:
    """The mode ``auto`` resolved to, and the provided calibration (None without one)."""

    mode: str
    provided: Calibration | None


def calibrate_sequence(sequence_work_dir: str | os.PathLike[str], config: CalibrateConfig | None = None) -> dict:
    """Calibrate one sequence's cameras (``<work>/<PID>/<SEQ>``); returns the stage report.

    Skipped when the stored record matches this config and the upstream records (ingest, and matte when
    masks are used). Raises :class:`CalibrationError` when an estimate fails and nothing was provided.
    """
    config = config or CalibrateConfig()

    def decide(store: CaptureStore) -> Decision[CalibratePlan]:
        provided = provided_calibration(store)
        mode = resolve_mode(config.mode, provided, store)
        # Masked features depend on the mattes; the provided calibration reads no frames at all.
        upstream = ("ingest", "matte") if config.use_masks and mode != "provided" else ("ingest",)
        for name in upstream[1:]:
            require_stage(store, name, STAGE)
        return Decision(CalibratePlan(mode, provided), {**config.result_fields(), "mode": mode}, inputs=upstream)

    return run_stage(SequenceWorkDir(sequence_work_dir), STAGE, VERSION, config.lock_timeout, decide,
                     lambda run, plan: _run(run, config, plan.mode, plan.provided),
                     clear_outputs=export.clear_outputs)


def _run(run: StageRun, config: CalibrateConfig, mode: str, provided: Calibration | None) -> dict:
    """Produce the calibration of a resolved mode and write it; the report and record come last."""
    store, work, chash = run.store, run.work, run.config_hash
    started = time.perf_counter()
    timer, warnings = colmap.Timer(), []
    report = {"stage": STAGE, "mode": config.mode, "resolved_mode": mode, "store": store.uri,
              "cameras_total": store.n_cameras, "size": [store.width, store.height], "warnings": warnings,
              "provided_calibration": provided is not None, "config": config.model_dump(), "config_hash": chash}
    if mode == "provided":
        outputs = write_outputs(store, work, provided, None, "provided")
        report.update(status=Status.COMPLETED, solution="provided", cameras=_provided_entries(store.cameras),
                      registered_cameras=store.n_cameras, outputs=outputs,
                      timings_s={"total": time.perf_counter() - started})
        return run.finish(report)

    estimate = _estimate(store, mode, provided, config, timer, warnings)
    report.update(estimate.summary)
    report.update(cameras={s: {**e, "problems": estimate.problems.get(s, [])} for s, e in estimate.cameras.items()},
                  registered_cameras=sum(e["registered"] for e in estimate.cameras.values()),
                  failed_cameras=estimate.failed_cameras,
                  timesteps_used=select_timesteps(store.n_frames, config.timesteps), masks=config.use_masks)
    if estimate.failed_cameras and provided is None:
        report.update(status=Status.FAILED, timings_s={**timer.seconds, "total": time.perf_counter() - started})
        work.write_report(STAGE, report)
        raise CalibrationError(_failure_message(store, estimate) + "\nno calibration was provided to fall back to; "
                               f"nothing was written (see {work.report_uri(STAGE)})")
    if estimate.failed_cameras:
        warnings.append(f"the {mode} estimate failed its checks for camera(s) {', '.join(estimate.failed_cameras)} "
                        "(see their problems); fell back to the provided calibration")
        outputs = write_outputs(store, work, provided, None, "provided (fallback)")
        report.update(status=Status.FALLBACK, solution="provided", outputs=outputs)
    else:
        outputs = write_outputs(store, work, estimate.calibration, estimate.reconstruction, mode)
        report.update(status=Status.COMPLETED, solution=mode, outputs=outputs)
    report["timings_s"] = {**timer.seconds, "total": time.perf_counter() - started}
    return run.finish(report)


def _estimate(store: CaptureStore, mode: str, provided: Calibration | None, config: CalibrateConfig,
              timer: colmap.Timer, warnings: list[str]) -> Estimate:
    """Run colmap or refine in a temporary folder; a pycolmap failure becomes a whole-estimate failure."""
    threads = config.threads or os.cpu_count() or 1
    solver = estimate_refine if mode == "refine" else estimate_colmap
    with tempfile.TemporaryDirectory(prefix="calibrate-") as folder, colmap.quiet_colmap():
        try:
            return solver(store, provided, config, Path(folder), threads, timer, warnings)
        except (PipelineError, StorageError):  # ours (a CalibrationError, a missing chunk are ValueErrors too)
            raise
        except (ValueError, RuntimeError) as error:  # pycolmap reports failed checks as these
            reason = f"COLMAP failed: {error}"
            entries = {s: {"registered": False, "observations": None, "reprojection_error_mean_px": None,
                           "reprojection_error_median_px": None} for s in store.cameras}
            return Estimate(Calibration({}, {}), None, entries, {s: [reason] for s in store.cameras},
                            {"failure": reason})
