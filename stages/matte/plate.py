"""Matting against a background plate: how far each pixel is from what the empty backdrop looked like.

A plain colour difference breaks in three ways on real rigs, and each step here exists for one of them:
the exposure or lighting drifts between the plate and the take (a gain map, estimated from pixels that
still look like the plate, divides it out); compression and sub-pixel vibration move fine backdrop
texture by a pixel (each pixel is compared with the best-matching plate pixel in a small neighbourhood);
and shading changes brightness more than hue (the brightness part of a residual can be down-weighted).
What remains is measured in units of the frame's own noise level, so one pair of thresholds works for
clean synthetic frames and for noisy studio footage.

With a plate the compositing equation ``I = a F + (1 - a) B`` has only ``a`` and ``F`` unknown; estimating
``F`` from nearby sure-foreground pixels turns the edge band into a per-pixel projection, which places edges
to a fraction of a pixel even where the codec blurred them. The same local ``F`` tells where the plate is
blind: where ``F`` and ``B`` have nearly the same colour, "looks like the plate" proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from stages.matte.refine import channel_sum

_EPS = 1.0 / 255.0


@dataclass(frozen=True)
class PlateEvidence:
    """What the plate says about one frame."""

    residual: np.ndarray  # (H, W) float32, change from the plate in noise units (0 = identical)
    alpha: np.ndarray  # (H, W) float32 in [0, 1], soft foreground from the residual alone
    plate: np.ndarray  # (H, W, 3) float32, the plate after gain compensation: the B of I = aF + (1-a)B
    noise: float  # the frame's noise level in [0, 1] colour units, for the report
    gain: np.ndarray  # (3,) median per-channel gain frame / plate


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]; every step below works in this unit."""
    return image.astype(np.float32) * np.float32(1.0 / 255.0)


def has_plate(plate: np.ndarray) -> bool:
    """The store keeps an all-zero plate where a camera had none."""
    return bool(plate.any())


def shift_tolerant_difference(frame: np.ndarray, plate: np.ndarray, radius: int = 1) -> np.ndarray:
    """Per-pixel (H, W, 3) difference to the plate pixel within ``radius`` that matches best.

    The best match is picked per pixel on the summed absolute difference, so a backdrop edge that moved
    by a pixel (codec, vibration) leaves no residual, while a subject pixel differs from all neighbours.
    """
    best = frame - plate
    best_cost = channel_sum(np.abs(best))
    height, width = frame.shape[:2]
    padded = cv2.copyMakeBorder(plate, radius, radius, radius, radius, cv2.BORDER_REPLICATE)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx == 0 and dy == 0:
                continue
            shifted = padded[radius + dy:radius + dy + height, radius + dx:radius + dx + width]
            diff = frame - shifted
            cost = channel_sum(cv2.absdiff(frame, shifted))
            better = cost < best_cost
            np.copyto(best_cost, cost, where=better)
            np.copyto(best, diff, where=better[..., None])
    return best


def normalized_box(values: np.ndarray, weights: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted local mean of (H, W, C) ``values`` in a box window, and the local weight density.

    Where the density is ~0 the mean is meaningless; callers decide what to do there.
    """
    num = cv2.boxFilter(values * weights[..., None], -1, (window, window), normalize=True,
                        borderType=cv2.BORDER_REFLECT)
    den = cv2.boxFilter(weights, -1, (window, window), normalize=True, borderType=cv2.BORDER_REFLECT)
    return num / np.maximum(den, 1e-6)[..., None], den


def gain_map(frame: np.ndarray, plate: np.ndarray, window_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Smooth per-channel gain frame/plate, from pixels that look unchanged; ((H, W, 3), (3,) median).

    Lighting drift and auto-exposure scale the backdrop smoothly; the subject covers a large part of the
    frame, so the gain is taken from the half of the pixels that differ least, first globally, then
    locally in a large window (a local illumination ratio).
    """
    ratio = np.clip((frame + _EPS) / (plate + _EPS), 0.25, 4.0)
    raw = channel_sum(cv2.absdiff(frame, plate))
    quiet = raw <= np.percentile(raw, 40)
    global_gain = np.median(ratio[quiet], axis=0).astype(np.float32)
    compensated = channel_sum(cv2.absdiff(frame, plate * global_gain))
    quiet = (compensated <= np.percentile(compensated, 50)).astype(np.float32)
    window = max(3, int(round(window_fraction * max(frame.shape[:2]))) | 1)
    local, density = normalized_box(ratio, quiet, window)
    local = np.where(density[..., None] > 1e-3, local, global_gain)
    return local.astype(np.float32), global_gain


def change_residual(diff: np.ndarray, plate: np.ndarray, brightness_weight: float) -> np.ndarray:
    """Length of the colour change, with the component along the plate's colour (brightness) weighted.

    Shading scales a colour along its own direction; a different material changes its direction. Splitting
    the difference into those two parts lets shading pass as backdrop without blinding the chroma test.
    """
    norm = np.sqrt(channel_sum(plate * plate))
    direction = plate / np.maximum(norm, _EPS)[..., None]
    along = channel_sum(diff * direction)
    across_squared = np.maximum(channel_sum(diff * diff) - along * along, 0.0)
    return np.sqrt(across_squared + (brightness_weight * along) ** 2).astype(np.float32)


def noise_level(residual: np.ndarray, floor: float) -> float:
    """Robust noise estimate: the median residual of the quieter half of the pixels (mostly backdrop)."""
    quiet = residual[residual <= np.percentile(residual, 50)]
    return max(float(np.median(quiet)) * 1.4826 if quiet.size else floor, floor)


def residual_to_alpha(residual: np.ndarray, low: float, high: float, blur_sigma: float = 1.0) -> np.ndarray:
    """Soft foreground from a residual in noise units: 0 below ``low``, 1 above ``high``, smooth between."""
    if blur_sigma > 0:
        residual = cv2.GaussianBlur(residual, (0, 0), blur_sigma)
    x = np.clip((residual - low) / max(high - low, 1e-6), 0.0, 1.0)
    return (x * x * (3.0 - 2.0 * x)).astype(np.float32)


def plate_evidence(frame: np.ndarray, plate_u8: np.ndarray, *, low: float, high: float,
                   brightness_weight: float, noise_floor: float = 0.006, shift_radius: int = 1) -> PlateEvidence:
    """Residual and soft alpha of one frame ((H, W, 3) float32) against its camera's plate ((H, W, 3) uint8)."""
    gains, global_gain = gain_map(frame, to_float(plate_u8))
    plate = to_float(plate_u8) * gains
    diff = shift_tolerant_difference(frame, plate, shift_radius)
    residual = change_residual(diff, plate, brightness_weight)
    noise = noise_level(residual, noise_floor)
    residual = residual / noise
    return PlateEvidence(residual=residual, alpha=residual_to_alpha(residual, low, high), plate=plate,
                         noise=noise, gain=global_gain)


# --- using the compositing equation -------------------------------------------------------------------------


def local_foreground_colour(frame: np.ndarray, mask: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """The subject's colour near each pixel (mean over sure-foreground pixels in a window), and its support.

    Sure foreground is the mask eroded by one pixel, so the codec-blurred edge does not leak backdrop in.
    """
    sure = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(np.float32)
    return normalized_box(frame, sure, window)


def plate_blindness(foreground: np.ndarray, support: np.ndarray, plate: np.ndarray, noise: float,
                    threshold: float) -> np.ndarray:
    """True where the nearby subject colour is within ``threshold`` noise units of the plate's colour.

    There a pixel that matches the plate may still be subject (camouflage), so another cue must decide.
    Far from any subject pixel the plate is trusted.
    """
    gap = foreground - plate
    separation = np.sqrt(channel_sum(gap * gap)) / noise
    return (support > 1e-3) & (separation < threshold)


def composite_edges(frame: np.ndarray, plate: np.ndarray, mask: np.ndarray, foreground: np.ndarray,
                    support: np.ndarray, band: int, noise: float, min_separation: float) -> np.ndarray:
    """Soft alpha from ``I = a F + (1 - a) B`` in a band of ``band`` pixels around the mask's edge.

    Projects ``I - B`` onto ``F - B``: a codec-blurred edge pixel halfway between the two colours gets 0.5.
    The projection of pure noise is about ``noise / |F - B|``; twice that is cut off at both ends, so the
    backdrop next to an edge stays exactly 0 and the subject exactly 1. Where ``F`` and ``B`` are closer
    than ``min_separation`` (colour units) the projection is all noise, so the binary mask is kept there
    and left to the edge-aware filter.
    """
    kernel = np.ones((2 * band + 1, 2 * band + 1), np.uint8)
    mask_u8 = mask.astype(np.uint8)
    in_band = (cv2.dilate(mask_u8, kernel) > 0) & ~(cv2.erode(mask_u8, kernel) > 0)
    towards = foreground - plate
    separation = channel_sum(towards * towards)
    projected = channel_sum((frame - plate) * towards) / np.maximum(separation, 1e-6)
    dead = np.minimum(2.0 * noise / np.sqrt(np.maximum(separation, 1e-6)), 0.25)
    projected = np.clip((projected - dead) / (1.0 - 2.0 * dead), 0.0, 1.0)
    usable = in_band & (separation > min_separation ** 2) & (support > 1e-3)
    return np.where(usable, projected, mask.astype(np.float32)).astype(np.float32)
