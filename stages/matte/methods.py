"""One frame's matte, per method: plate, saliency model (rembg), or both fused.

The two cues fail in opposite places. The plate sees every pixel that changed, thin strands included, but is
blind where the subject has the backdrop's colour. The saliency model sees a head as a whole, whatever the
backdrop, but its 320x320 output is blurry, it drops thin or unusual parts (shoulders, a shirt) and may
swallow a salient patch of backdrop. Fusing therefore lets the plate decide wherever it can see, and asks the
model only where the plate is blind: holes inside the subject and pixels whose nearby subject colour equals
the plate's. Every method ends with the same edge-aware refinement; temporal smoothing happens per camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.matte.config import MatteConfig
from stages.matte.plate import (
    PlateEvidence,
    composite_edges,
    local_foreground_colour,
    plate_blindness,
    plate_evidence,
)
from stages.matte.refine import fill_holes, refine_edges, remove_specks

FOREGROUND_WINDOW = 9  # px: the neighbourhood whose subject colour is the F of the compositing equation
SALIENCY_GUIDED_RADIUS = 4  # px: the model's mask is blurry at this scale, so its refinement looks wider
# [0, 1] colour units: the backdrop's residual against its own plate is codec and sensor noise, 1-5/255 on real
# and synthetic footage; a plate of another camera, crop or set-up leaves 15/255 and more
MAX_PLATE_NOISE = 10.0 / 255.0


@dataclass(frozen=True)
class FrameMatte:
    """A frame's alpha and what the report wants to know about it."""

    alpha: np.ndarray  # (H, W) float32 in [0, 1]
    noise: float | None = None  # the plate residual's noise level, where a plate was used
    agreement: float | None = None  # fused: IoU of the plate's and the model's masks; low = plate may not fit


def _areas(config: MatteConfig, shape: tuple[int, ...]) -> tuple[int, int]:
    pixels = shape[0] * shape[1]
    return max(1, round(config.min_speck * pixels)), round(config.max_hole * pixels)


def _evidence(frame: np.ndarray, plate: np.ndarray, config: MatteConfig) -> PlateEvidence:
    return plate_evidence(frame, plate, low=config.low, high=config.high, brightness_weight=config.brightness_weight)


def _plate_edges(frame: np.ndarray, evidence: PlateEvidence, mask: np.ndarray, config: MatteConfig) -> np.ndarray:
    """Compositing-equation edges, then the guided filter for the parts the equation cannot solve."""
    foreground, support = local_foreground_colour(frame, mask, FOREGROUND_WINDOW)
    alpha = composite_edges(frame, evidence.plate, mask, foreground, support, config.edge_band, evidence.noise,
                            min_separation=config.high * evidence.noise)
    return refine_edges(frame, alpha, config.guided_radius, config.guided_eps)


def matte_plate(frame: np.ndarray, plate: np.ndarray, config: MatteConfig) -> FrameMatte:
    """Plate only: change from the plate, specks dropped, small enclosed holes filled, edges solved."""
    evidence = _evidence(frame, plate, config)
    min_area, max_hole = _areas(config, frame.shape)
    mask = fill_holes(remove_specks(evidence.alpha > 0.5, min_area), max_area=max_hole)
    return FrameMatte(_plate_edges(frame, evidence, mask, config), evidence.noise)


def matte_saliency(frame: np.ndarray, saliency: np.ndarray, config: MatteConfig) -> FrameMatte:
    """Model only: its soft mask, snapped to the frame's colour edges."""
    min_area, _ = _areas(config, frame.shape)
    mask = remove_specks(saliency > 0.5, min_area)
    alpha = np.where(mask | (saliency <= 0.5), saliency, 0.0).astype(np.float32)
    return FrameMatte(refine_edges(frame, alpha, max(config.guided_radius, SALIENCY_GUIDED_RADIUS), config.guided_eps))


def matte_fused(frame: np.ndarray, plate: np.ndarray, saliency: np.ndarray, config: MatteConfig) -> FrameMatte:
    """Plate where it can see, the model where it is blind (enclosed holes, camouflaged pixels).

    A plate that does not fit the take at all (residual noise far above a codec's) is blind everywhere, so
    the model alone decides that frame.
    """
    evidence = _evidence(frame, plate, config)
    min_area, _ = _areas(config, frame.shape)
    salient = saliency > 0.5
    mask = fill_holes(remove_specks(evidence.alpha > 0.5, min_area), support=saliency)
    agreement = float((mask & salient).sum() / max(int((mask | salient).sum()), 1))
    if evidence.noise > MAX_PLATE_NOISE:
        return FrameMatte(matte_saliency(frame, saliency, config).alpha, evidence.noise, agreement)
    foreground, support = local_foreground_colour(frame, mask, FOREGROUND_WINDOW)
    blind = plate_blindness(foreground, support, evidence.plate, evidence.noise, config.blind_threshold)
    mask = fill_holes(remove_specks(mask | (salient & blind), min_area), support=saliency)
    return FrameMatte(_plate_edges(frame, evidence, mask, config), evidence.noise, agreement)
