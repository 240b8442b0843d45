"""``make demo``: the whole pipeline on a built-in synthetic capture, so a new user sees it work in minutes.

A 16-camera capture is synthesised, then one ``process-sequence`` flow run takes it from raw videos to a
turntable video and hold-out metrics with the ``preview`` preset, training for a fixed time budget. The run
reports to the Prefect server when one is running (``make ui``), else to Prefect's ephemeral API, whose
database ``make ui`` serves afterwards.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from stages.config import PipelineConfig
from stages.evaluate.config import EvaluateConfig
from stages.export.config import ExportConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig


def demo_config(train_seconds: float) -> PipelineConfig:
    """What fits the demo's 15 minutes on 2 CPU cores: plate matting (the synthetic rig has perfect plates, and
    rembg's ~1 s per frame would dominate), the preview preset stopped by a time budget, a 3 s turntable (the
    only video; evaluate renders the hold-out views it scores) and the hold-out protocol on 3 timesteps."""
    return PipelineConfig(
        matte=MatteConfig(method="plate"),
        # One torch thread: the Prefect API server shares the two cores, and oversubscribed OpenMP threads make
        # the small per-step matmuls many times slower.
        optimize=OptimizeConfig(preset="preview", time_budget_s=train_seconds, threads=1),
        export=ExportConfig(turntable=True, holdout=False, seconds=3.0, fps=12.0),
        evaluate=EvaluateConfig(timesteps=3),
    )


def run_demo(out: Path, frames: int = 12, train_seconds: float = 300.0) -> None:
    from flows.local_api import flow_run_page, prefect_api
    from pipeline.synthetic import synthesize_capture

    started = time.monotonic()
    out = out.resolve()
    archive, work = out / "archive", out / "work"
    typer.echo(f"1/2 synthesising a 16-camera capture ({frames} frames, 220x320) under {archive} ...")
    capture = synthesize_capture(archive, frames=frames)
    typer.echo(f"    {capture.sequence_dir} ({time.monotonic() - started:.0f} s)")
    with prefect_api() as api_url:
        from flows.sequence import STAGES, process_sequence

        where = f"the Prefect server at {api_url}" if api_url else "Prefect's ephemeral API (SQLite in PREFECT_HOME)"
        typer.echo(f"2/2 the process-sequence flow ({', '.join(STAGES)}) into {work}, reporting to {where};")
        typer.echo(f"    training stops after {train_seconds:.0f} s ...")
        state = process_sequence(str(capture.sequence_dir), str(work), demo_config(train_seconds),
                                 return_state=True)
        page = flow_run_page(state.state_details.flow_run_id, api_url)
    if not state.is_completed():
        typer.secho(f"the flow run ended {state.name}: {state.message}", fg=typer.colors.RED, err=True)
        typer.echo(f"its logs: {page}", err=True)
        raise typer.Exit(1)
    reports = state.result()
    for stage, report in reports.items():
        typer.echo(f"    {stage:<10} {report.get('status')}")
    _print_results(work / capture.participant_dir.name / capture.sequence_dir.name, reports)
    typer.echo(f"\nThe flow run in the UI: {page}")
    if not api_url:
        typer.echo("    (start the UI first: `make ui` or `nersemble-pipeline ui`, then open the link)")
    typer.echo(f"\nDemo finished in {(time.monotonic() - started) / 60:.1f} min.")


def _print_results(sequence_work: Path, reports: dict) -> None:
    typer.echo(f"\nOutputs under {sequence_work}/")
    for label, path in (("turntable", "export/turntable.mp4"), ("metrics", "export/metrics.json"),
                        ("training curves", "nersemble/training_curves.png"), ("training log", "nersemble/train.log")):
        if (sequence_work / path).exists():
            typer.echo(f"    {label:<16} {sequence_work / path}")
    previews = sorted(p.name for p in (sequence_work / "export" / "previews").glob("*.png"))
    if previews:
        typer.echo(f"    {'previews':<16} {sequence_work / 'export' / 'previews'}/ ({', '.join(previews)})")
    evaluation = sequence_work / "export" / "evaluation"
    if evaluation.is_dir():
        typer.echo(f"    {'hold-out sheets':<16} {evaluation}/")
    evaluate, optimize = reports.get("evaluate", {}), reports.get("optimize", {})
    if evaluate.get("psnr") is not None:
        typer.echo(f"\nHold-out cameras {', '.join(optimize.get('holdout_cameras') or [])}: "
                   f"PSNR {evaluate['psnr']:.2f} dB, SSIM {evaluate.get('ssim', float('nan')):.3f}"
                   f" (training: {optimize.get('steps')} steps, train PSNR {optimize.get('psnr_train')})")
