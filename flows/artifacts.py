"""Stage reports as Prefect artifacts, so a run reads well in the UI without opening any file.

Every stage gets a markdown summary of its report; stages that work per camera (calibrate, matte, depth,
evaluate) also get a table with one row per camera; export and evaluate add links to the files they wrote.
Keys are ``<what>-<participant>-<sequence>``, so the Artifacts page keeps one history per sequence.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

_SKIP = {"config", "warnings", "errors", "frame_indices", "stage", "status", "results"}
_PER_CAMERA_KEYS = ("cameras", "per_camera")


def artifact_key(*parts: str) -> str:
    """Prefect keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    if isinstance(value, list) and len(value) > 8:
        return f"{len(value)} items"
    return str(value)


def report_markdown(stage: str, report: dict) -> str:
    """A report as a two-column table, with its warnings and errors listed below it."""
    skip = _SKIP | (set(_PER_CAMERA_KEYS) if per_camera_rows(report) else set())  # those go into their own table
    lines = [f"### {stage}: {report.get('status', 'unknown')}", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in report.items() if key not in skip]
    for reference, result in (report.get("results") or {}).items():  # evaluate: overall figures per reference
        if isinstance(result, dict) and isinstance(result.get("overall"), dict):
            lines.append(f"| overall vs {reference} | {_cell(result['overall'])} |")
    for title in ("warnings", "errors"):
        if report.get(title):
            lines += ["", f"**{title}**", ""] + [f"- {item}" for item in report[title]]
    return "\n".join(lines)


def per_camera_rows(report: dict) -> list[dict]:
    """One row per camera from a report's ``cameras`` (or ``per_camera``) mapping, scalar fields only.

    Lists of problems are joined into one cell: a failed camera's reason belongs in its row.
    """
    cameras = next((report[key] for key in _PER_CAMERA_KEYS if isinstance(report.get(key), dict)), None)
    if not cameras or not all(isinstance(entry, dict) for entry in cameras.values()):
        return []
    rows = []
    for serial, entry in cameras.items():
        row: dict = {"camera": str(serial)}
        for name, value in entry.items():
            if isinstance(value, float):
                row[name] = round(value, 4)
            elif value is None or isinstance(value, (bool, int, str)):
                row[name] = value
            elif isinstance(value, list) and all(isinstance(item, str) for item in value):
                row[name] = "; ".join(value)
        rows.append(row)
    return rows


def evaluation_rows(report: dict) -> list[dict]:
    """Evaluate's per-camera metrics, one row per (reference, camera): ``results.<reference>.cameras``."""
    rows = []
    for reference, result in (report.get("results") or {}).items():
        if isinstance(result, dict):
            rows += [{"reference": reference, **row} for row in per_camera_rows(result)]
    return rows


def publish_stage_report(stage: str, participant: str, sequence: str, report: dict) -> None:
    """The stage's markdown summary, and its per-camera table where it has one."""
    create_markdown_artifact(
        key=artifact_key(stage, participant, sequence),
        markdown=report_markdown(stage, report),
        description=f"{stage} report of {participant}/{sequence}",
    )
    rows = per_camera_rows(report) or evaluation_rows(report)
    if rows:
        create_table_artifact(
            key=artifact_key(stage, "cameras", participant, sequence),
            table=rows,
            description=f"{stage} per camera, {participant}/{sequence}",
        )


def link_for(uri: str) -> str:
    """A clickable link: local paths become ``file://`` URLs, fsspec URLs stay as they are."""
    return uri if "://" in uri else Path(uri).resolve().as_uri()


def publish_output_link(what: str, participant: str, sequence: str, uri: str, text: str) -> None:
    """A link artifact to an output file (turntable video, metrics), for the run's Artifacts tab."""
    create_link_artifact(
        key=artifact_key(what, participant, sequence),
        link=link_for(uri),
        link_text=text,
        description=f"{text} of {participant}/{sequence}",
    )


def publish_archive_summary(rows: list[dict], archive_root: str) -> None:
    """The archive run's table: one row per sequence with status, time, PSNR and the error of failures."""
    create_table_artifact(
        key="archive-summary",
        table=rows or [{"participant": "", "sequence": "", "status": "nothing to process"}],
        description=f"process-archive over {archive_root}",
    )
