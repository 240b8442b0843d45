"""Turning coarse foreground evidence into a clean, soft, temporally steady matte.

Three independent tools, each fixing one artefact: connected-component clean-up (speckles on the backdrop,
holes inside the subject where its colour matches the backdrop), an edge-aware guided filter (snaps a blurry
or blocky mask to the frame's own colour edges and gives soft, sub-pixel edges), and a temporal filter that
averages a pixel's matte over neighbouring frames only where the frame itself did not change there, so a
static backdrop cannot flicker while the moving subject is not smeared.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import TypeVar

import cv2
import numpy as np

Item = TypeVar("Item")
_ONES = np.ones((1, 3), np.float32)


def channel_sum(image: np.ndarray) -> np.ndarray:
    """Sum over the colour axis of an (H, W, 3) float32 image; OpenCV does this several times faster than numpy."""
    return cv2.transform(image, _ONES)


# --- connected components -----------------------------------------------------------------------------------


def remove_specks(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop foreground components smaller than ``min_area`` pixels (codec noise, dust on the backdrop)."""
    if min_area <= 1 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    return keep[labels]


def enclosed_holes(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the background regions that do not touch the image border: (labels, count), 0 = not a hole.

    A head seen by a rig camera never has real backdrop fully enclosed by skin, so such regions are almost
    always foreground whose colour matched the plate.
    """
    background = (~mask).astype(np.uint8)
    count, labels = cv2.connectedComponents(background, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    is_hole = np.ones(count, dtype=bool)
    is_hole[border] = False
    is_hole[0] = False
    relabel = np.where(is_hole, np.arange(count), 0)
    return relabel[labels], count


def fill_holes(mask: np.ndarray, max_area: int | None = None, support: np.ndarray | None = None,
               min_support: float = 0.5) -> np.ndarray:
    """Fill enclosed background regions up to ``max_area`` pixels, or those where ``support`` agrees.

    ``support`` (a soft foreground map from another method) decides each hole on its own: a hole is filled
    when its mean support reaches ``min_support``, whatever its size.
    """
    labels, count = enclosed_holes(mask)
    if count <= 1 or not labels.any():
        return mask
    areas = np.bincount(labels.ravel(), minlength=count)
    fill = np.zeros(count, dtype=bool)
    if max_area is not None:
        fill |= areas <= max_area
    if support is not None:
        sums = np.bincount(labels.ravel(), weights=support.ravel().astype(np.float64), minlength=count)
        fill |= sums / np.maximum(areas, 1) >= min_support
    fill[0] = False
    return mask | fill[labels]


# --- guided filter ------------------------------------------------------------------------------------------


def _box(image: np.ndarray, radius: int) -> np.ndarray:
    size = 2 * radius + 1
    return cv2.boxFilter(image, -1, (size, size), normalize=True, borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Colour guided filter (He et al.): ``source`` (H, W) re-expressed as a local affine function of ``guide``.

    ``guide`` is (H, W, 3) float32 in [0, 1]. Inside a window the output follows the guide's colour edges;
    ``eps`` sets how strong an edge must be to be followed rather than smoothed across.
    """
    # (H, W, 3) temporaries are written in place: at rig resolution each fresh one is tens of megabytes of newly
    # faulted pages, which made the per-pixel cost grow with the frame size (issue 22); the arithmetic is unchanged
    guide = np.asarray(guide, dtype=np.float32)
    source = np.asarray(source, dtype=np.float32)
    mean_i = _box(guide, radius)
    mean_p = _box(source, radius)
    cov_ip = _box(np.multiply(guide, source[..., None]), radius)
    cov_ip -= mean_i * mean_p[..., None]
    products = {}
    for a in range(3):
        for b in range(a, 3):
            products[a, b] = _box(guide[..., a] * guide[..., b], radius)
            products[a, b] -= mean_i[..., a] * mean_i[..., b]
    s00, s01, s02 = products[0, 0] + eps, products[0, 1], products[0, 2]
    s11, s12, s22 = products[1, 1] + eps, products[1, 2], products[2, 2] + eps
    # inverse of the symmetric 3x3 covariance via its adjugate
    i00 = s11 * s22 - s12 * s12
    i01 = s02 * s12 - s01 * s22
    i02 = s01 * s12 - s02 * s11
    i11 = s00 * s22 - s02 * s02
    i12 = s02 * s01 - s00 * s12
    i22 = s00 * s11 - s01 * s01
    det = s00 * i00 + s01 * i01 + s02 * i02
    c0, c1, c2 = cov_ip[..., 0], cov_ip[..., 1], cov_ip[..., 2]
    a = np.stack([i00 * c0 + i01 * c1 + i02 * c2,
                  i01 * c0 + i11 * c1 + i12 * c2,
                  i02 * c0 + i12 * c1 + i22 * c2], axis=-1)
    a /= det[..., None]
    b = mean_p - channel_sum(np.multiply(a, mean_i, out=mean_i))
    box_a = _box(a, radius)
    box_a *= guide
    return channel_sum(box_a) + _box(b, radius)


def refine_edges(frame: np.ndarray, alpha: np.ndarray, radius: int, eps: float, snap: float = 0.04) -> np.ndarray:
    """Guided-filter a coarse alpha against its frame; pixels far from an edge stay put.

    The filter's local affine model leaks a few percent across strong edges (its known halo); values within
    ``snap`` of 0 or 1 are that leak, not coverage, and are snapped so the backdrop stays exactly 0.
    """
    refined = np.clip(guided_filter(frame, alpha, radius, eps), 0.0, 1.0)
    refined[refined < snap] = 0.0
    refined[refined > 1.0 - snap] = 1.0
    # only a band around the coarse edge may change: the filter must not invent mass far from the subject
    band = cv2.dilate((alpha > snap).astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)) > 0
    core = cv2.erode((alpha > 1.0 - snap).astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)) > 0
    return np.where(core, 1.0, np.where(band, refined, 0.0)).astype(np.float32)


# --- temporal consistency -----------------------------------------------------------------------------------


def sliding_window(items: Iterable[Item], radius: int) -> Iterator[tuple[Item, list[Item]]]:
    """Yield (item, its neighbours within ``radius`` on both sides), holding at most 2*radius+1 items.

    Matting streams a camera's frames; this keeps memory bounded while each frame sees its neighbours.
    """
    window: deque[tuple[int, Item]] = deque()
    center = 0
    for index, item in enumerate(items):
        window.append((index, item))
        while center <= index - radius:
            yield _centred(window, center, radius)
            center += 1
            while window and window[0][0] < center - radius:
                window.popleft()
    while window and center <= window[-1][0]:
        yield _centred(window, center, radius)
        center += 1


def _centred(window: deque[tuple[int, Item]], center: int, radius: int) -> tuple[Item, list[Item]]:
    item = next(x for i, x in window if i == center)
    return item, [x for i, x in window if i != center and abs(i - center) <= radius]


def temporal_filter(frame: np.ndarray, alpha: np.ndarray, neighbours: list[tuple[np.ndarray, np.ndarray]],
                    cutoff: float) -> np.ndarray:
    """Average ``alpha`` with the neighbours' mattes, per pixel weighted by how unchanged the frame is there.

    ``frame`` and neighbour frames are (H, W, 3) float32 in [0, 1]; ``cutoff`` is the colour change (summed
    over channels after a small blur, in [0, 1] units) from which a neighbour no longer counts at all. On a
    static backdrop the weight is ~1 and noise averages out; where the subject moved it is exactly 0, so
    a solid subject stays exactly opaque instead of picking up a trace of the backdrop.
    """
    total = alpha.astype(np.float32).copy()
    weight = np.ones_like(total)
    for other_frame, other_alpha in neighbours:
        change = channel_sum(cv2.absdiff(frame, other_frame))
        change = cv2.GaussianBlur(change, (0, 0), 1.5)
        w = np.square(np.clip(1.0 - np.square(change / cutoff), 0.0, 1.0)).astype(np.float32)
        total += w * other_alpha
        weight += w
    return total / weight
