"""``make demo``: the pipeline on a built-in synthetic capture, so a new user sees it work in minutes."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.config import IngestConfig


def run_demo(out: Path, frames: int = 24) -> None:
    from pipeline.synthetic import synthesize_capture
    from stages.ingest import ingest_sequence

    archive, work = out / "archive", out / "work"
    typer.echo(f"1/2 synthesising a 16-camera capture ({frames} frames, 220x320) under {archive} ...")
    capture = synthesize_capture(archive, frames=frames)
    typer.echo(f"    {capture.sequence_dir}")
    typer.echo(f"2/2 ingesting it into {work} ...")
    report = ingest_sequence(capture.sequence_dir, str(work), IngestConfig())
    typer.echo(f"    {report['status']}: {report['store']} ({report['frames']} frames x {len(report['cameras'])} "
               f"cameras, {report['frames_per_second']} frames/s)")
    sequence_work = work / capture.participant_dir.name / capture.sequence_dir.name
    typer.echo("\nWhat runs next on this sequence (stages land one by one; see README.md):")
    for step in ("calibrate", "matte", "depth", "optimize --preset preview", "export --turntable", "evaluate"):
        typer.echo(f"  nersemble-pipeline {step.split()[0]} {sequence_work} {' '.join(step.split()[1:])}".rstrip())
