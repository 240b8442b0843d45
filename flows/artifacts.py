"""Stage reports as Prefect artifacts, so a run reads well in the UI without opening any file.

Every stage gets a markdown summary of its report (its key figures, a thumbnail where it made a picture, the
short fields as a table and the long ones as a list below it); stages that work per camera (calibrate, matte,
depth, evaluate) also get a table with one row per camera; export and evaluate add links to the files they
wrote. They are published from inside the stage's task run, so each task run's Artifacts tab holds its stage's
artifacts. The sequence run itself carries one overview (``sequence-<pid>-<seq>``), updated in place as
stages finish, with the stages in pipeline order: the UI lists a run's artifacts in no particular order.
Keys are ``<what>-<participant>-<sequence>``, so the Artifacts page keeps one history per sequence.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.figures import stage_figures
from stages.rendering.thumbnails import image_file_uri, markdown_image, video_strip_uri
from stages.table import STAGE_NAMES, stage as stage_row
from storage import SequenceWorkDir
from storage.viewers import running_viewer_url

_log = logging.getLogger(__name__)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger (its lines show in the UI) inside a flow or task run, else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return _log

_SKIP = {"config", "warnings", "errors", "frame_indices", "stage", "status", "results", "sheets"}
_PER_CAMERA_KEYS = ("cameras", "per_camera")
LONG_CELL = 60  # characters: a longer value would run past the table's right edge on the artifact page


def artifact_key(*parts: str) -> str:
    """Prefect keys allow only lowercase letters, digits and dashes."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def is_empty(value: object) -> bool:
    """Nothing worth a cell: None, an empty string, list or mapping."""
    return value is None or (isinstance(value, (str, list, tuple, dict)) and len(value) == 0)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_cell, value))
    return str(value).replace("|", "\\|").replace("\n", " ")


def _detail_lines(key: str, value: object, depth: int = 0) -> list[str]:
    """A long value as a bullet (bullets wrap); mappings holding mappings as nested bullets."""
    indent = "  " * depth
    if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
        lines = [f"{indent}- **{key}**"]
        for name, item in value.items():
            if not is_empty(item):
                lines += _detail_lines(str(name), item, depth + 1)
        return lines
    return [f"{indent}- **{key}**: {_cell(value)}"]


def report_markdown(stage: str, report: dict, pictures: list[tuple[str, str]] | None = None) -> str:
    """A report as a headline with its key figures, its pictures, a two-column table of the short fields and a
    list of the long ones; warnings and errors listed last. Empty fields are left out."""
    skip = _SKIP | (set(_PER_CAMERA_KEYS) if per_camera_rows(report) else set())  # those go into their own table
    figures = stage_figures(stage, report)
    lines = [f"### {stage}: {report.get('status', 'unknown')}", ""]
    if figures:
        lines += [figures, ""]
    for alt, uri in pictures or []:
        lines += [f"**{alt}**", "", markdown_image(alt, uri), ""]
    short, long = [], []
    for key, value in report.items():
        if key in skip or is_empty(value):
            continue
        text = _cell(value)
        (long if len(text) > LONG_CELL else short).append((key, value, text))
    for reference, result in (report.get("results") or {}).items():  # evaluate: overall figures per reference
        if isinstance(result, dict) and isinstance(result.get("overall"), dict):
            short.append((f"overall vs {reference}", result["overall"], _cell(result["overall"])))
    if short:
        lines += ["| field | value |", "| --- | --- |"] + [f"| {key} | {text} |" for key, _, text in short]
    if long:
        lines += ["", "**details**", ""]
        for key, value, _ in long:
            lines += _detail_lines(key, value)
    for title in ("warnings", "errors"):
        if report.get(title):
            lines += ["", f"**{title}**", ""] + [f"- {item}" for item in report[title]]
    return "\n".join(lines)


def per_camera_rows(report: dict) -> list[dict]:
    """One row per camera from a report's ``cameras`` (or ``per_camera``) mapping, scalar fields only.

    Lists of problems are joined into one cell: a failed camera's reason belongs in its row. Columns empty in
    every row (a provided calibration has no reprojection errors) are left out.
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
    filled = {name for row in rows for name, value in row.items() if not is_empty(value)}
    return [{name: value for name, value in row.items() if name in filled} for row in rows]


def evaluation_rows(report: dict) -> list[dict]:
    """Evaluate's per-camera metrics, one row per (reference, camera): ``results.<reference>.cameras``."""
    rows = []
    for reference, result in (report.get("results") or {}).items():
        if isinstance(result, dict):
            rows += [{"reference": reference, **row} for row in per_camera_rows(result)]
    return rows


def _relative(work: SequenceWorkDir, uri: str) -> str | None:
    """``uri`` relative to the work folder, or None when it lies elsewhere."""
    prefix = work.uri.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else None


def stage_pictures(stage: str, work: SequenceWorkDir, report: dict) -> list[tuple[str, str]]:
    """(caption, data URI) of the stage's pictures: its table's image links, a strip of its videos, and
    evaluate's hold-out comparison sheets. A picture that cannot be made is left out and logged."""
    wanted: list[tuple[str, str, str]] = []  # caption, path in the work folder, kind
    for link in stage_row(stage).links:
        suffix = Path(link.path).suffix.lower()
        if suffix in (".png", ".jpg", ".jpeg"):
            wanted.append((link.label, link.path, "plot" if "curve" in link.key else "photo"))
        elif suffix == ".mp4":
            wanted.append((f"{link.label} (frames)", link.path, "video"))
    for camera, uri in (report.get("sheets") or {}).items():
        relative = _relative(work, str(uri))
        if relative:
            wanted.append((f"hold-out camera {camera}: reference | render | error", relative, "photo"))
    pictures = []
    for caption, path, kind in wanted:
        try:
            uri = video_strip_uri(work, path) if kind == "video" else image_file_uri(work, path, kind == "photo")
        except Exception as error:  # noqa: BLE001 - a picture is a convenience, never a reason to fail a stage
            run_logger().warning("no picture of %s for %s: %s", path, work.uri, error)
            continue
        if uri:
            pictures.append((caption, uri))
    return pictures


def publish_stage_report(stage: str, participant: str, sequence: str, report: dict,
                         work: SequenceWorkDir | None = None) -> None:
    """The stage's markdown summary (with its pictures when ``work`` is given) and its per-camera table."""
    pictures = stage_pictures(stage, work, report) if work is not None else []
    create_markdown_artifact(
        key=artifact_key(stage, participant, sequence),
        markdown=report_markdown(stage, report, pictures),
        description=f"{stage} report of {participant}/{sequence}",
    )
    rows = per_camera_rows(report) or evaluation_rows(report)
    if rows:
        create_table_artifact(
            key=artifact_key(stage, "cameras", participant, sequence),
            table=rows,
            description=f"{stage} per camera, {participant}/{sequence}",
        )


def publish_stage(stage: str, work: SequenceWorkDir, report: dict) -> None:
    """Everything the UI shows of one finished stage: summary, pictures, per-camera table, output links.

    Publishing never fails the stage: an unreachable API or an unreadable file is logged and skipped.
    """
    try:
        publish_stage_report(stage, work.participant, work.sequence, report, work)
        publish_output_links(stage, work)
    except Exception as error:  # noqa: BLE001 - the UI is a view on the run, never a reason to fail it
        run_logger().warning("could not publish the %s report of %s: %s", stage, work.uri, error)


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


def publish_output_links(stage: str, work: SequenceWorkDir) -> None:
    """Link artifacts to the files of the stage's table row that exist (previews, curves, videos, metrics)."""
    for link in stage_row(stage).links:
        parts = link.path.split("/")
        if work.exists(*parts):
            publish_output_link(link.key, work.participant, work.sequence, work.path(*parts), link.label)


def publish_archive_summary(rows: list[dict], archive_root: str) -> None:
    """The archive run's table: one row per sequence with status, time, PSNR and the error of failures."""
    create_table_artifact(
        key="archive-summary",
        table=rows or [{"participant": "", "sequence": "", "status": "nothing to process"}],
        description=f"process-archive over {archive_root}",
    )


def update_markdown_artifact(artifact_id: UUID, markdown: str, description: str | None = None) -> None:
    """Replace a markdown artifact's text in place: one card that changes, not a new version per change."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactUpdate

    fields: dict[str, Any] = {"data": markdown}
    if description is not None:
        fields["description"] = description
    with get_client(sync_client=True) as client:
        client.update_artifact(artifact_id, ArtifactUpdate(**fields))


class SequenceOverview:
    """The sequence run's one overview artifact: a row per stage in pipeline order, updated in place.

    Rows: status, key figures and seconds of each stage so far; a failed stage shows its error. The task runs
    hold each stage's full report and pictures.
    """

    def __init__(self, participant: str, sequence: str, stages: list[str], work: SequenceWorkDir | None = None):
        self.work = work  # names the viewer command once the model is trained
        self.key = artifact_key("sequence", participant, sequence)
        self.label = f"{participant}/{sequence}"
        self.rows: dict[str, tuple[str, str]] = {stage: ("waiting", "") for stage in stages}
        self.headline = "running"
        self._artifact_id: UUID | None = None

    def stage(self, stage: str, status: str, figures: str) -> None:
        self.rows[stage] = (status, figures)
        self.publish()

    def finish(self, headline: str) -> None:
        self.headline = headline
        self.publish()

    def markdown(self) -> str:
        lines = [f"### {self.label}: {self.headline}", "", "| stage | status | key figures |", "| --- | --- | --- |"]
        for stage in STAGE_NAMES:  # pipeline order, whatever order the rows were filled in
            if stage in self.rows:
                status, figures = self.rows[stage]
                lines.append(f"| {stage} | {status} | {_cell(figures) or ' '} |")
        lines += ["", "Each stage's report, pictures and per-camera table: the task run of that stage "
                      "(`<stage> " + self.label + "`), or this run's Artifacts tab under *Task runs*."]
        if self.work is not None and self.rows.get("optimize", ("",))[0] in ("completed", "done", "skipped"):
            lines += ["", f"Orbit the trained head in a browser: `nersemble-pipeline view {self.work.uri}`."]
            url = running_viewer_url(self.work)
            if url:
                lines.append(f"A viewer is running for it: [{url}]({url})")
        return "\n".join(lines)

    def publish(self) -> None:
        """Create the artifact on first call, then update it; failures are logged, never raised."""
        try:
            if self._artifact_id is None:
                self._artifact_id = create_markdown_artifact(
                    key=self.key, markdown=self.markdown(), description=f"overview of {self.label}")
            else:
                update_markdown_artifact(self._artifact_id, self.markdown())
        except Exception as error:  # noqa: BLE001 - the UI must never stop the run
            run_logger().warning("could not publish the overview of %s: %s", self.label, error)
