"""Stage reports as Prefect artifacts, so a run reads well in the UI without opening any file."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact

_SKIP = {"config", "warnings", "errors", "frame_indices", "stage", "status"}


def artifact_key(*parts: str) -> str:
    """Prefect keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def _cell(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, list) and len(value) > 8:
        return f"{len(value)} items"
    return str(value)


def report_markdown(stage: str, report: dict) -> str:
    """A report as a two-column table, with its warnings and errors listed below it."""
    lines = [f"### {stage}: {report.get('status', 'unknown')}", "", "| field | value |", "| --- | --- |"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in report.items() if key not in _SKIP]
    for title in ("warnings", "errors"):
        if report.get(title):
            lines += ["", f"**{title}**", ""] + [f"- {item}" for item in report[title]]
    return "\n".join(lines)


def publish_stage_report(stage: str, participant: str, sequence: str, report: dict) -> None:
    create_markdown_artifact(
        key=artifact_key(stage, participant, sequence),
        markdown=report_markdown(stage, report),
        description=f"{stage} report of {participant}/{sequence}",
    )
