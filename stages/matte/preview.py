"""A contact sheet of the matte: what a person checks before trusting a run's numbers.

Each cell shows a frame, its alpha and the frame composited on white, for a few cameras spread over the rig
and a few frames spread over the take. White is chosen because a leftover backdrop fringe shows as coloured
pixels against it, and a hole in the subject as white inside the face.
"""

from __future__ import annotations

import cv2
import numpy as np

from storage import CaptureStore

GAP = 4  # px between panels
MAX_CELL_HEIGHT = 200  # px: big captures are shrunk so the sheet stays a few megapixels
LABEL_HEIGHT = 16


def spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices spread evenly over ``range(count)`` (all of them when there are few)."""
    if count <= wanted:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, wanted)})


def composite_on_white(frame: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the subject over a white card, using the soft alpha."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.round(frame.astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _cell(frame: np.ndarray, alpha: np.ndarray, label: str) -> np.ndarray:
    """Frame | alpha | composite side by side, with a label strip on top."""
    panels = [frame, np.repeat(alpha[..., None], 3, axis=-1), composite_on_white(frame, alpha)]
    gap = np.full((frame.shape[0], GAP, 3), 40, np.uint8)
    row = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    if row.shape[0] > MAX_CELL_HEIGHT:
        scale = MAX_CELL_HEIGHT / row.shape[0]
        row = cv2.resize(row, (max(1, round(row.shape[1] * scale)), MAX_CELL_HEIGHT), interpolation=cv2.INTER_AREA)
    strip = np.full((LABEL_HEIGHT, row.shape[1], 3), 24, np.uint8)
    cv2.putText(strip, label, (3, LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (230, 230, 230), 1, cv2.LINE_AA)
    return np.concatenate([strip, row], axis=0)


def _pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    out = np.full((height, width, 3), 40, np.uint8)
    out[:image.shape[0], :image.shape[1]] = image
    return out


def contact_sheet(store: CaptureStore, cameras: list[int], frames: list[int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB sheet: one row per camera, one cell (frame | alpha | composite) per frame."""
    serials = store.cameras
    rows = []
    for c in cameras:
        cells = [_cell(store.read_frame(c, t), store.read_alpha(c, t), f"camera {serials[c]}  t={t}") for t in frames]
        rows.append(_join(cells, axis=1))
    return _join(rows, axis=0)


def _join(images: list[np.ndarray], axis: int) -> np.ndarray:
    """Concatenate with a gap, padding to a common size along the other axis."""
    height = max(i.shape[0] for i in images)
    width = max(i.shape[1] for i in images)
    padded = [_pad_to(i, height, i.shape[1]) if axis == 1 else _pad_to(i, i.shape[0], width) for i in images]
    gap_shape = (height, GAP, 3) if axis == 1 else (GAP, width, 3)
    parts: list[np.ndarray] = []
    for image in padded:
        if parts:
            parts.append(np.full(gap_shape, 40, np.uint8))
        parts.append(image)
    return np.concatenate(parts, axis=axis)


def encode_png(image: np.ndarray) -> bytes:
    """RGB uint8 -> PNG bytes."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise ValueError("could not encode the matte preview as PNG")
    return data.tobytes()
