"""``make demo``: the pipeline on a built-in synthetic capture, so a new user sees it work in minutes."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from pipeline.config import IngestConfig, MatteConfig


def run_demo(out: Path, frames: int = 24) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # first start migrates a DB
    from flows.sequence import STAGES, process_sequence
    from pipeline.synthetic import synthesize_capture

    archive, work = out / "archive", out / "work"
    typer.echo(f"1/2 synthesising a 16-camera capture ({frames} frames, 220x320) under {archive} ...")
    capture = synthesize_capture(archive, frames=frames)
    typer.echo(f"    {capture.sequence_dir}")
    typer.echo(f"2/2 running the process-sequence flow ({', '.join(STAGES)}) into {work} ...")
    # Plate matting: the synthetic rig has perfect plates, and rembg's ~1 s per frame would dominate the demo.
    reports = process_sequence(str(capture.sequence_dir), str(work.resolve()), IngestConfig(),
                               matte=MatteConfig(method="plate"))
    for stage, report in reports.items():
        typer.echo(f"    {stage:<10} {report['status']}")
    sequence_work = work / capture.participant_dir.name / capture.sequence_dir.name
    typer.echo(f"\nOutputs: {sequence_work}/ (capture.zarr, calibration/, reports/, export/previews/)")
    typer.echo("\nWhat runs next on this sequence (stages land one by one; see README.md):")
    for step in ("optimize --preset preview", "export --turntable", "evaluate"):
        command, *options = step.split()
        typer.echo(f"  nersemble-pipeline {command} {sequence_work} {' '.join(options)}".rstrip())
