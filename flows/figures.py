"""A stage's key figures in one line ("16 cameras, 24 frames, 220x320, in 12.3 s"), from its report.

Which keys each stage shows is the stage table's ``summary_keys``; how a key reads is decided here, once per
key, so every stage that reports ``seconds`` or ``coverage`` says it the same way. Missing or empty values
are left out rather than shown as ``None``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stages.table import stage as stage_row


def _count(noun: str) -> Callable[[Any, dict], str | None]:
    def format_count(value: Any, report: dict) -> str | None:
        n = len(value) if isinstance(value, (list, tuple, dict)) else value
        if not isinstance(n, int) or isinstance(n, bool):
            return None
        return f"{n} {noun}" if n != 1 else f"1 {noun.replace('s ', ' ', 1) if 's ' in noun else noun.removesuffix('s')}"

    return format_count


def _seconds(value: Any, report: dict) -> str | None:
    if isinstance(value, dict):  # timings_s: the total is what an operator compares between runs
        value = value.get("total")
    return f"in {value:.1f} s" if isinstance(value, (int, float)) else None


def _number(template: str) -> Callable[[Any, dict], str | None]:
    def format_number(value: Any, report: dict) -> str | None:
        if isinstance(value, dict):  # e.g. reprojection_error_px: {"mean": ...}
            value = value.get("mean")
        return template.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return format_number


def _steps(value: Any, report: dict) -> str | None:
    planned = report.get("steps_planned")
    return f"{value}/{planned} steps" if planned and planned != value else f"{value} steps"


def _size(value: Any, report: dict) -> str | None:
    return f"{value[0]}x{value[1]}" if isinstance(value, (list, tuple)) and len(value) == 2 else None


def _text(template: str) -> Callable[[Any, dict], str | None]:
    return lambda value, report: template.format(value) if value not in (None, "") else None


FORMATS: dict[str, Callable[[Any, dict], str | None]] = {
    "cameras": _count("cameras"),
    "cameras_total": _count("cameras"),
    "frames": _count("frames"),
    "frames_matted": _count("frames matted"),
    "images": _count("images"),
    "size": _size,
    "steps": _steps,
    "solution": _text("{} calibration"),
    "method": _text("{}"),
    "stopped_by": lambda value, report: None if value in (None, "", "steps") else f"stopped by {value}",
    "coverage": _number("coverage {:.0%}"),
    "reprojection_error_px": _number("reprojection error {:.2f} px"),
    "psnr_train": _number("train PSNR {:.2f} dB"),
    "psnr": _number("PSNR {:.2f} dB"),
    "ssim": _number("SSIM {:.3f}"),
    "lpips": _number("LPIPS {:.3f}"),
    "seconds": _seconds,
    "decode_seconds": _seconds,
    "train_seconds": _seconds,
    "timings_s": _seconds,
}


def stage_figures(stage: str, report: dict) -> str:
    """The stage's summary keys, formatted and joined by ', '; '' when the report has none of them."""
    parts = []
    for key in stage_row(stage).summary_keys:
        value = report.get(key)
        if value is None:
            continue
        formatted = FORMATS.get(key, _text(f"{key} {{}}"))(value, report)
        if formatted:
            parts.append(formatted)
    return ", ".join(parts)


def stage_line(stage: str, report: dict) -> str:
    """``<stage> <status>: <figures>`` (a skipped stage shows the figures of the run that finished it)."""
    status = str(report.get("status", "unknown"))
    figures = stage_figures(stage, report)
    if status == "skipped" and figures:
        figures = f"finished earlier: {figures}"
    if not figures and report.get("errors"):
        figures = "; ".join(map(str, report["errors"]))[:300]
    return f"{stage} {status}: {figures}" if figures else f"{stage} {status}"
