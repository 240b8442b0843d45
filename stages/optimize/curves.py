"""Training curves as a PNG drawn with OpenCV (no plotting library is a dependency)."""

from __future__ import annotations

import cv2
import numpy as np

PANEL_W, PANEL_H, MARGIN = 480, 300, 48
COLORS = [(200, 80, 30), (40, 140, 40), (30, 30, 200), (160, 40, 160), (0, 140, 200), (90, 90, 90), (120, 60, 0)]


def _panel(title: str, x: np.ndarray, series: dict[str, np.ndarray], log_y: bool) -> np.ndarray:
    image = np.full((PANEL_H, PANEL_W, 3), 255, np.uint8)
    cv2.putText(image, title, (MARGIN, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    values = {k: (np.log10(np.maximum(v, 1e-12)) if log_y else v) for k, v in series.items() if len(v)}
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()]) if values else np.zeros(0)
    if len(x) < 2 or finite.size == 0:
        return image
    lo, hi = float(finite.min()), float(finite.max())
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = float(x.min()), float(max(x.max(), x.min() + 1))
    left, right, top, bottom = MARGIN, PANEL_W - 12, 30, PANEL_H - 30
    cv2.rectangle(image, (left, top), (right, bottom), (180, 180, 180), 1)
    for label, y_value in ((hi, top), (lo, bottom)):
        text = f"1e{label:.1f}" if log_y else f"{label:.3g}"
        cv2.putText(image, text, (2, y_value + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(image, f"step {int(x1)}", (right - 80, PANEL_H - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1,
                cv2.LINE_AA)
    for index, (name, v) in enumerate(values.items()):
        color = COLORS[index % len(COLORS)]
        px = left + (x - x0) / (x1 - x0) * (right - left)
        py = bottom - (np.nan_to_num(v, nan=lo) - lo) / (hi - lo) * (bottom - top)
        points = np.stack([px, py], axis=1).round().astype(np.int32)
        cv2.polylines(image, [points], False, color, 1, cv2.LINE_AA)
        cv2.putText(image, name, (left + 6 + 70 * (index % 5), top + 14 + 12 * (index // 5)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.35, color, 1, cv2.LINE_AA)
    return image


def training_curves_png(history: list[dict[str, float]]) -> bytes:
    """Loss terms (log scale) and batch PSNR against the step, side by side."""
    x = np.array([row["step"] for row in history], float)
    skip = {"step", "elapsed_s", "psnr", "samples", "rays"}
    names = sorted({k for row in history for k in row} - skip)
    losses = {k: np.array([row.get(k, np.nan) for row in history], float) for k in names}
    psnr = {"psnr (batch)": np.array([row.get("psnr", np.nan) for row in history], float)}
    return line_panels_png([("losses (log10)", x, losses), ("PSNR dB", x, psnr)], log_y=(True, False))


def line_panels_png(panels: list[tuple[str, np.ndarray, dict[str, np.ndarray]]],
                    log_y: tuple[bool, ...] | None = None) -> bytes:
    """Panels of named lines against a shared kind of x (steps), side by side, as PNG bytes."""
    flags = log_y or (False,) * len(panels)
    image = np.concatenate([_panel(title, x, series, log) for (title, x, series), log in zip(panels, flags)],
                           axis=1)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("could not encode the curves")
    return encoded.tobytes()
