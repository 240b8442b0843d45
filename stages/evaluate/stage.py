"""Evaluate: NeRSemble's hold-out protocol on the trained model -- PSNR, SSIM, LPIPS per camera and overall.

The paper's protocol (reference/nersemble-method.md section 6): render every hold-out camera at evenly spaced
timesteps (``np.linspace(0, T-1, n, dtype=int)``, 15 by default, or all) on white, and compare with the ground
truth composited on white with the matting stage's alpha ("regular"), and with both images additionally
blended with that alpha ("masked"). A synthetic capture's exact images are scored separately when its
``ground_truth.zarr`` is given, and are then the headline (``psnr``/``ssim``/``lpips``): the matte reference
carries the matting and compression error, which caps what it can measure; the matte reference's own score
against the exact images is reported beside it. Every image also gets the share of its error that lies in a
2-pixel band around the reference's silhouette. A model trained with nothing held out is recorded as such,
with no scores. Writes ``export/metrics.json`` (every image's scores), one comparison sheet
per hold-out camera (``export/evaluation/cam_<SERIAL>.png``: GT | render | error) and ``reports/evaluate.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.evaluate.config import EvaluateConfig
from stages.core.bookkeeping import PRODUCED_BY
from stages.core.skeleton import Decision, StageRun, run_stage
from stages.core.status import Status
from stages.geometry.holdout import digest_part, recorded_cameras
from stages.rendering.model import (StoreCameras, load_checked_model, resolve_device, store_cameras,
                                 torch_threads)
from stages.rendering.paths import CameraView
from stages.rendering.render import progress_ticker, render_view
from stages.rendering.sheets import encode_png, sheet_row, stack_sheet
from stages.evaluate.truth import Reference, SyntheticTruth, matte_reference
from stages.evaluate.metrics import (PSNR_SETTINGS, SILHOUETTE_BAND_PX, SSIM_SETTINGS, Lpips, band_scores,
                                     load_lpips, mse, psnr, silhouette_band, ssim)
from storage import CaptureStore, SequenceWorkDir, digest_of

STAGE = "evaluate"
VERSION = "1"
METRICS_PATH = "export/metrics.json"
SHEET_DIR = "export/evaluation"

ProgressCallback = Callable[[int, int], None]  # (images evaluated, images in all)


def evaluation_timesteps(n_timesteps: int, wanted: int) -> list[int]:
    """Upstream's evenly spaced frames, ``linspace(0, T-1, n)`` truncated to integers; 0 (or n >= T) = every frame."""
    if wanted <= 0 or wanted >= n_timesteps:
        return list(range(n_timesteps))
    return [int(t) for t in np.linspace(0, n_timesteps - 1, wanted, dtype=int)]


def masked(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``a * image + (1 - a) * white``: the paper's "masked" variant blends both images with the GT alpha."""
    return image * alpha[..., None] + (1.0 - alpha[..., None])


def score(pred: np.ndarray, ref: Reference, lpips: Lpips | None) -> dict[str, float | None]:
    """Every metric of one image: regular (unmasked) PSNR/SSIM/MSE(/LPIPS), masked PSNR/SSIM, and the silhouette
    band's PSNR and shares of the error and of the pixels (the band of the reference's alpha)."""
    p, g = torch.from_numpy(pred), torch.from_numpy(ref.image)
    pm, gm = torch.from_numpy(masked(pred, ref.alpha)), torch.from_numpy(masked(ref.image, ref.alpha))
    scores: dict[str, float | None] = {"psnr": psnr(p, g), "ssim": ssim(p, g), "mse": mse(p, g),
                                       "masked_psnr": psnr(pm, gm), "masked_ssim": ssim(pm, gm)}
    scores.update(band_scores(pred, ref.image, silhouette_band(ref.alpha)))
    if lpips is not None:
        scores["lpips"] = lpips.score(p, g)
    return scores


def _mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per metric, the mean over the images that have it (an image without a silhouette has no band PSNR)."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float)))
    return {k: round(float(np.mean([r[k] for r in rows if isinstance(r.get(k), float)])), 6) for k in keys}


def summarise(images: list[dict[str, Any]], serials: list[str]) -> dict[str, Any]:
    """Averages over every evaluated image (the paper's headline) and per camera."""
    return {"overall": _mean(images), "images": len(images),
            "cameras": {s: _mean([r for r in images if r["camera"] == s]) for s in serials}}


@dataclass
class EvaluatePlan:
    device: torch.device
    cameras: StoreCameras
    timesteps: list[int]
    truth: SyntheticTruth | None
    truth_digest: str | None
    warnings: list[str] = field(default_factory=list)


def found_ground_truth(store: CaptureStore) -> str | None:
    """A synthetic capture's ``ground_truth.zarr`` beside the videos the store was ingested from, if any."""
    source = store.attrs.get("source_sequence_dir")
    candidate = Path(source) / "ground_truth.zarr" if source else None
    return str(candidate) if candidate is not None and (candidate / "zarr.json").exists() else None


def plan_evaluate(store: CaptureStore, config: EvaluateConfig) -> EvaluatePlan:
    device = resolve_device(config.device, STAGE)
    cameras = store_cameras(store, STAGE)
    truth, truth_digest = None, None
    ground_truth = config.ground_truth or found_ground_truth(store)
    if ground_truth:
        truth = SyntheticTruth(ground_truth, store)
        marker = Path(ground_truth) / "zarr.json"
        truth_digest = digest_of(str(Path(ground_truth).resolve()),
                                 marker.stat().st_mtime_ns if marker.exists() else None)
    return EvaluatePlan(device=device, cameras=cameras,
                        timesteps=evaluation_timesteps(store.n_frames, config.timesteps), truth=truth,
                        truth_digest=truth_digest)


def evaluate_sequence(sequence_work_dir: str | os.PathLike[str], config: EvaluateConfig = EvaluateConfig(),
                      progress: ProgressCallback | None = None) -> dict:
    """Score the trained model on the hold-out cameras of one sequence; returns the stage report.

    Needs the ingest, calibrate, matte and optimize records; skipped when its own record matches this config
    and those upstream records.
    """
    work = SequenceWorkDir(sequence_work_dir)

    def decide(store: CaptureStore) -> Decision[EvaluatePlan]:
        plan = plan_evaluate(store, config)
        # "scores": the band metrics and the exact-image headline are new, so older records re-run once.
        return Decision(plan, {**config.result_fields(), "ground_truth": plan.truth_digest, "scores": "band-2px"},
                        extra=digest_part(recorded_cameras(store)))

    def prepare(store: CaptureStore, plan: EvaluatePlan) -> tuple[EvaluatePlan, Any]:
        return plan, load_checked_model(work, store, plan.device, STAGE, config.eval_substeps, plan.warnings)

    def evaluate(run: StageRun, ready: tuple[EvaluatePlan, Any]) -> dict:
        plan, trained = ready
        if not trained.holdout_cameras:
            return _nothing_held_out(run, config, plan, trained)
        return _run(run, config, plan, trained, progress)

    return run_stage(work, STAGE, VERSION, config.lock_timeout, decide, evaluate, prepare=prepare)


def _nothing_held_out(run: StageRun, config: EvaluateConfig, plan: EvaluatePlan, trained: Any) -> dict:
    """The record of a model trained on every camera: there is no view it has not seen, so no score."""
    holdout = run.store.holdout or {"cameras": [], "method": "none",
                                    "reason": "the model was trained on every camera"}
    message = (f"nothing is held out ({holdout.get('method')}: {holdout.get('reason')}); every camera trained, so "
               f"there is no unseen view to score; choose hold-out cameras with `{PRODUCED_BY['depth']} --holdout "
               f"auto` (then optimize) to measure novel views")
    report = {
        "stage": STAGE, "status": Status.COMPLETED, "store": run.work.capture_uri, "device": str(plan.device),
        "model_step": trained.step, "holdout": holdout,
        "protocol": {"cameras": [], "timesteps": plan.timesteps, "lpips": "not run: nothing is held out"},
        "results": {}, "headline": None, "psnr": None, "ssim": None, "lpips": None, "metrics": None, "sheets": {},
        "images": 0, "seconds": 0.0, "render_seconds": 0.0, "warnings": [*plan.warnings, message],
        "config": config.model_dump(), "config_hash": run.config_hash,
    }
    return run.finish(report)


@dataclass
class _Scores:
    """Every evaluated image's scores per reference, the same for a plain white image (the floor), the sheets."""

    references: list[str]
    images: dict[str, list[dict]] = field(default_factory=dict)
    baseline: dict[str, list[dict]] = field(default_factory=dict)
    sheets: dict[str, str] = field(default_factory=dict)
    render_seconds: float = 0.0
    matte_vs_exact: list[dict] = field(default_factory=list)  # the matte reference scored against the exact images

    def __post_init__(self) -> None:
        self.images = {name: [] for name in self.references}
        self.baseline = {name: [] for name in self.references}


def _score_camera(work: SequenceWorkDir, store: CaptureStore, config: EvaluateConfig, plan: EvaluatePlan,
                  trained: Any, serial: str, scorer: Lpips | None, scores: _Scores,
                  tick: Callable[[], None]) -> None:
    """Render one hold-out camera at every evaluated timestep, score it against each reference, write its sheet."""
    cams = plan.cameras
    rows = []
    for t in plan.timesteps:
        view = CameraView(K=cams.intrinsics[serial], world_2_cam=cams.world_2_cam[serial], width=cams.width,
                          height=cams.height, time=t / max(trained.n_timesteps - 1, 1))
        clock = time.perf_counter()
        pred = render_view(trained.model, view, trained.n_timesteps, config.chunk).rgb.clip(0, 1)
        scores.render_seconds += time.perf_counter() - clock
        where = {"camera": serial, "timestep": t, "frame_index": store.frame_indices[t]}
        white = np.ones_like(pred)
        matte = matte_reference(store, serial, t)
        for name in scores.references:
            ref = matte if name == "matte" else plan.truth.reference(serial, t)
            scores.images[name].append({**where, **score(pred, ref, scorer)})
            scores.baseline[name].append({**where, **score(white, ref, None)})
            if name == "synthetic":  # how far the matte reference itself is from the exact image
                scores.matte_vs_exact.append({**where, **score(matte.image, ref, None)})
            if name == "matte":
                rows.append(sheet_row(ref.image, pred, f"{serial} t={t} "
                                      f"PSNR {scores.images[name][-1]['psnr']:.2f} dB"))
        tick()
    scores.sheets[serial] = work.write_bytes(f"{SHEET_DIR}/cam_{serial}.png",
                                             encode_png(stack_sheet(rows, f"{work.participant}/{work.sequence} "
                                                                          f"camera {serial} step {trained.step}")))


def _protocol(plan: EvaluatePlan, trained: Any, serials: list[str], filtered: int | None,
              lpips: Lpips | str, headline: str) -> dict[str, Any]:
    """How the scores were made, written beside them so a number is never read without its protocol."""
    cams = plan.cameras
    return {
        "cameras": serials,
        "timesteps": plan.timesteps,
        "size": [cams.width, cams.height],
        "background": "white",
        "references": {"matte": "stored frame composited on white with the matting stage's alpha",
                       **({"synthetic": "exact synthetic image (analytic re-render with the rig's true camera) "
                                        "composited on white with exact coverage"} if plan.truth else {})},
        "masked": "both images additionally blended with the reference's alpha, as the paper's masked metrics",
        "unmasked": "psnr, ssim, mse, lpips: the whole image on white, as the paper's regular metrics",
        "silhouette_band": {"width_px": SILHOUETTE_BAND_PX,
                            "definition": "pixels within width_px of the edge of the reference's alpha >= 0.5, "
                                          "either side (the exact alpha for synthetic, the matte for matte)",
                            "keys": {"band_psnr": "PSNR over the band's pixels",
                                     "band_error_share": "the band's share of the image's squared error",
                                     "band_pixel_share": "the band's share of the image's pixels"}},
        "headline": (f"{headline}: psnr, ssim and lpips at the top of the report are against the "
                     + ("exact synthetic images; results.synthetic.matte_reference scores the matte reference "
                        "itself against them" if plan.truth else "matte reference")),
        "eval_substeps": trained.config.sampler.eval_substeps,  # renders march the training step / this
        "occupancy_filter": ("off (eval.occupancy_filter)" if filtered is None else
                             f"largest connected component kept, {filtered} occupied cells dropped"),
        "psnr": PSNR_SETTINGS,
        "ssim": SSIM_SETTINGS,
        "lpips": {"backbone": "alex", "backend": lpips.backend} if isinstance(lpips, Lpips) else lpips,
    }


def _run(run: StageRun, config: EvaluateConfig, plan: EvaluatePlan, trained: Any,
         progress: ProgressCallback | None) -> dict:
    """Render and score every hold-out view, then write the metrics file, the report and the record."""
    store, work = run.store, run.work
    started = time.perf_counter()
    # The official evaluation renders after dropping disconnected floaters from the occupancy grid.
    filtered = trained.model.filter_occupancy() if trained.config.eval.occupancy_filter else None
    lpips = load_lpips(plan.device) if config.lpips else "disabled (--no-lpips)"
    scorer = lpips if isinstance(lpips, Lpips) else None
    serials = list(trained.holdout_cameras)
    scores = _Scores(["matte"] + (["synthetic"] if plan.truth else []))
    total = len(serials) * len(plan.timesteps)
    tick = progress_ticker(progress, total)
    with torch_threads(config.threads):
        for serial in serials:
            _score_camera(work, store, config, plan, trained, serial, scorer, scores, tick)
    results = {name: summarise(scores.images[name], serials) for name in scores.references}
    for name in scores.references:
        results[name]["white_image_baseline"] = _mean(scores.baseline[name])
    if scores.matte_vs_exact:
        results["synthetic"]["matte_reference"] = summarise(scores.matte_vs_exact, serials)
    headline = "synthetic" if plan.truth else "matte"
    protocol = _protocol(plan, trained, serials, filtered, lpips, headline)
    metrics_uri = work.write_json(METRICS_PATH, {
        "protocol": protocol, "model_step": trained.step,
        "results": {name: {**results[name], "per_image": scores.images[name]} for name in scores.references}})
    wall = time.perf_counter() - started
    report = {
        "stage": STAGE,
        "status": Status.COMPLETED,
        "store": work.capture_uri,
        "device": str(plan.device),
        "model_step": trained.step,
        "protocol": protocol,
        "results": results,
        "headline": headline,
        "holdout": store.holdout,
        "psnr": results[headline]["overall"]["psnr"],
        "ssim": results[headline]["overall"]["ssim"],
        "lpips": results[headline]["overall"].get("lpips", protocol["lpips"]),
        "metrics": metrics_uri,
        "sheets": scores.sheets,
        "images": total,
        "seconds": round(wall, 3),
        "render_seconds": round(scores.render_seconds, 3),
        "warnings": plan.warnings,
        "config": config.model_dump(),
        "config_hash": run.config_hash,
    }
    return run.finish(report)
