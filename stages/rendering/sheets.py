"""Pictures for people: error heat maps, depth colouring, comparison sheets, PNG and alpha helpers.

A sheet has to stay readable at any capture size, so large frames shrink to a fixed cell height; error maps use a
fixed scale (stated on the sheet) so sheets of different runs can be compared by eye.
"""

from __future__ import annotations

import cv2  # before anything that may import pycolmap
import numpy as np

from stages.core.errors import PipelineError

ERROR_SCALE = 0.25  # mean absolute RGB error mapped to the top of the colour map
MAX_CELL = 320  # px: the most a sheet cell's height may be


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 with rounding."""
    return np.round(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def error_heatmap(pred: np.ndarray, target: np.ndarray, scale: float = ERROR_SCALE) -> np.ndarray:
    """(H, W, 3) RGB: mean absolute error per pixel, 0 dark blue .. ``scale`` and above dark red (turbo)."""
    error = np.abs(np.asarray(pred, np.float32) - np.asarray(target, np.float32)).mean(axis=-1)
    bgr = cv2.applyColorMap(to_uint8(error / scale), cv2.COLORMAP_TURBO)
    return np.ascontiguousarray(bgr[..., ::-1])


def colourise_depth(depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """(H, W, 3) RGB: near is warm, far is cool (turbo, as upstream's inverted map), no depth (0) is black."""
    depth = np.asarray(depth, np.float32)
    scaled = np.clip((far - depth) / max(far - near, 1e-6), 0.0, 1.0)
    bgr = cv2.applyColorMap(to_uint8(scaled), cv2.COLORMAP_TURBO)
    bgr[depth <= 0] = 0
    return np.ascontiguousarray(bgr[..., ::-1])


def grey_to_rgb(alpha: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8: an alpha matte as a normal 3-channel video frame."""
    grey = to_uint8(alpha)
    return np.repeat(grey[..., None], 3, axis=-1)


def unpremultiply_on_white(rgb_on_white: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA from a render composited on white: colour = (rgb - (1 - a)) / a."""
    rgb, a = np.asarray(rgb_on_white, np.float32), np.asarray(alpha, np.float32)[..., None]
    colour = np.where(a > 1e-4, (rgb - (1.0 - a)) / np.maximum(a, 1e-4), 1.0)
    return np.concatenate([to_uint8(colour), to_uint8(a)], axis=-1)


def encode_png(image: np.ndarray) -> bytes:
    """RGB or RGBA uint8 -> PNG bytes."""
    image = np.ascontiguousarray(image)
    bgr = image[..., [2, 1, 0, 3]] if image.shape[-1] == 4 else image[..., ::-1]
    ok, data = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise PipelineError("could not encode an image as PNG")
    return data.tobytes()


def _label(image: np.ndarray, text: str, height: int = 16) -> np.ndarray:
    strip = np.full((height, image.shape[1], 3), 24, np.uint8)
    cv2.putText(strip, text, (3, height - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (230, 230, 230), 1, cv2.LINE_AA)
    return np.concatenate([strip, image], axis=0)


def cell_size(width: int, height: int) -> tuple[int, int]:
    """A sheet cell's (width, height): small frames keep their size, large ones shrink into the height band."""
    cell_h = min(height, MAX_CELL)
    return max(1, round(width * cell_h / height)), cell_h


def sheet_row(gt: np.ndarray, render: np.ndarray, label: str, scale: float = ERROR_SCALE) -> np.ndarray:
    """One labelled row GT | render | error heat map at cell size (uint8), so a sheet never holds full frames."""
    height, width = gt.shape[:2]
    size = cell_size(width, height)
    cells = [to_uint8(gt), to_uint8(render), error_heatmap(render, gt, scale)]
    if size != (width, height):
        cells = [cv2.resize(c, size, interpolation=cv2.INTER_AREA) for c in cells]
    gap = np.full((size[1], 4, 3), 40, np.uint8)
    return _label(np.concatenate([cells[0], gap, cells[1], gap, cells[2]], axis=1), label)


def stack_sheet(rows: list[np.ndarray], title: str, scale: float = ERROR_SCALE) -> np.ndarray:
    """Rows from :func:`sheet_row` under a title that states the columns and the error scale."""
    if not rows:
        raise PipelineError("a comparison sheet needs at least one row")
    return _label(np.concatenate(rows, axis=0), f"{title}   GT | render | |error| 0..{scale:g} (turbo)")


def comparison_sheet(rows: list[tuple[np.ndarray, np.ndarray, str]], title: str,
                     scale: float = ERROR_SCALE) -> np.ndarray:
    """(H, W, 3) RGB: per row (GT, render, label) the columns GT | render | error heat map, float images in [0, 1]."""
    return stack_sheet([sheet_row(gt, render, label, scale) for gt, render, label in rows], title, scale)
