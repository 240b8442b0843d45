"""Image metrics for the hold-out protocol: PSNR, SSIM in plain torch, LPIPS only when it can run offline.

NeRSemble and nerfstudio use torchmetrics; it is not a dependency here, so SSIM is written out with the same
settings (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, 'valid' filtering: the mean over pixels whose
window lies inside the image) and a fixed data range of 1 instead of upstream's inferred one, so a score does
not depend on the images' contents. The tests hold it against scikit-image configured identically.

LPIPS needs ImageNet backbone weights. They are never downloaded: LPIPS runs only when an LPIPS
implementation (the ``lpips`` package or torchmetrics) and torchvision import *and* the AlexNet checkpoint is
already in torch's hub cache (``$TORCH_HOME/hub/checkpoints``); otherwise the report says why it is missing.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

SSIM_SETTINGS = {"window": "gaussian", "kernel_size": 11, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "data_range": 1.0,
                 "filtering": "valid (mean over pixels whose 11x11 window lies inside the image, as torchmetrics)",
                 "channels": "per channel, averaged"}
PSNR_SETTINGS = {"data_range": 1.0, "formula": "-10 log10(MSE), per image, then averaged",
                 "cap_db": 100.0}
SILHOUETTE_BAND_PX = 2.0  # the band around the true silhouette whose share of the error the report gives
ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"  # torchvision's file name for AlexNet ImageNet weights


def _as_batch(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) or (N, H, W, 3) in [0, 1] -> (N, 3, H, W) float64 for stable statistics."""
    image = torch.as_tensor(image)
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected (H, W, C) or (N, H, W, C) images, got {tuple(image.shape)}")
    return image.permute(0, 3, 1, 2).to(torch.float64)


def mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(((_as_batch(pred) - _as_batch(target)) ** 2).mean())


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """-10 log10(MSE) for images in [0, 1]; identical images give the 100 dB cap instead of infinity."""
    error = mse(pred, target)
    return PSNR_SETTINGS["cap_db"] if error <= 10 ** (-PSNR_SETTINGS["cap_db"] / 10) else -10.0 * math.log10(error)


def silhouette_band(alpha: np.ndarray, width_px: float = SILHOUETTE_BAND_PX) -> np.ndarray:
    """(H, W) bool: pixels within ``width_px`` of the silhouette, on either side.

    The silhouette is the edge of ``alpha >= 0.5``; a pixel is in the band when the nearest pixel on the other
    side lies at most ``width_px`` away (Euclidean, between pixel centres; neighbours across the edge are 1
    apart). Matte errors, partial coverage and the model's soft edges all live here, so the share of an
    image's error in the band tells edge error apart from surface error.
    """
    inside = (np.asarray(alpha) >= 0.5).astype(np.uint8)
    if inside.all() or not inside.any():
        return np.zeros(inside.shape, bool)
    to_outside = cv2.distanceTransform(inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    to_inside = cv2.distanceTransform(1 - inside, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.where(inside > 0, to_outside, to_inside) <= width_px


def band_scores(pred: np.ndarray, target: np.ndarray, band: np.ndarray) -> dict[str, float | None]:
    """PSNR inside the band, and the band's share of the image's squared error and of its pixels."""
    error = ((np.asarray(pred, np.float64) - np.asarray(target, np.float64)) ** 2).sum(-1)
    total = float(error.sum())
    inside = float(error[band].sum())
    band_mse = inside / (3 * band.sum()) if band.any() else None
    cap = PSNR_SETTINGS["cap_db"]
    band_psnr = None if band_mse is None else (cap if band_mse <= 10 ** (-cap / 10) else -10.0 * math.log10(band_mse))
    return {"band_psnr": band_psnr, "band_error_share": inside / total if total > 0 else 0.0,
            "band_pixel_share": float(band.mean())}


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 1-d Gaussian that torchmetrics builds (taps at -(size-1)/2 .. (size-1)/2)."""
    taps = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    window = torch.exp(-(taps / sigma) ** 2 / 2)
    return window / window.sum()


def ssim_map(pred: torch.Tensor, target: torch.Tensor, *, kernel_size: int = 11, sigma: float = 1.5,
             k1: float = 0.01, k2: float = 0.03, data_range: float = 1.0) -> torch.Tensor:
    """(N, C, H - k + 1, W - k + 1) SSIM per pixel and channel, 'valid' filtering."""
    x, y = _as_batch(pred), _as_batch(target)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < kernel_size:
        raise ValueError(f"SSIM needs images of at least {kernel_size}x{kernel_size}, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    g = gaussian_window(kernel_size, sigma).to(x.device)
    rows = g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    cols = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(image, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM with :data:`SSIM_SETTINGS`."""
    settings = {k: SSIM_SETTINGS[k] for k in ("kernel_size", "sigma", "k1", "k2", "data_range")}
    return float(ssim_map(pred, target, **settings).mean())


# --- LPIPS, offline only -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lpips:
    """A ready LPIPS (AlexNet) scorer: ``score(pred, target)`` on (H, W, 3) images in [0, 1]."""

    backend: str
    score: Callable[[torch.Tensor, torch.Tensor], float]


def _hub_checkpoint() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT


def lpips_unavailable_reason() -> str | None:
    """Why LPIPS cannot run without a download, or None when it can."""
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed (LPIPS needs its AlexNet)"
    if importlib.util.find_spec("lpips") is None and importlib.util.find_spec("torchmetrics") is None:
        return "neither the lpips package nor torchmetrics is installed"
    checkpoint = _hub_checkpoint()
    if not checkpoint.is_file():
        return f"the AlexNet weights are not in torch's hub cache ({checkpoint}); they are never downloaded"
    return None


def load_lpips(device: torch.device) -> Lpips | str:
    """An LPIPS scorer, or a string that says why there is none. Runs only with the weights already on disk."""
    reason = lpips_unavailable_reason()
    if reason is not None:
        return f"unavailable: {reason}"
    try:
        if importlib.util.find_spec("lpips") is not None:
            import lpips

            net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

            def score(pred: torch.Tensor, target: torch.Tensor) -> float:
                a, b = (_as_batch(i).float().to(device) * 2 - 1 for i in (pred, target))
                with torch.no_grad():
                    return float(net(a, b).mean())

            return Lpips("lpips (alex)", score)
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device).eval()

        def score_tm(pred: torch.Tensor, target: torch.Tensor) -> float:
            a, b = (_as_batch(i).float().to(device).clamp(0, 1) for i in (pred, target))
            with torch.no_grad():
                return float(metric(a, b))

        return Lpips("torchmetrics (alex)", score_tm)
    except Exception as error:  # noqa: BLE001 - any failure to build it offline means "unavailable", with the cause
        return f"unavailable: could not build LPIPS offline ({type(error).__name__}: {error})"
