"""The training loop: rays from a rotating cache of (camera, timestep) images, checkpoints, progress.

The loop only needs an :class:`ImageSource` (cameras plus a ``load(view, timestep)``), so it knows nothing
about zarr or the work folder; ``stages/optimize.py`` adapts the capture store to it. As upstream (nerfstudio's
cached datamanager), rays are drawn uniformly from ``train.images_per_batch`` images that are redrawn every
``train.repeat_images + 1`` steps, so memory holds a few images, never the sequence.

Checkpoints hold plain tensors, numbers and strings only, so they load with ``torch.load(weights_only=True)``.
Each file ends with a SHA-256 of everything before it, written last: a file cut short or with flipped bytes
(tensor data or header) fails :func:`load_checkpoint` with :class:`CheckpointError` naming the file, before torch
reads a byte of it, so a damaged checkpoint is never trained on or rendered from.

Checkpoints written before the hash existed end without it. Such a file still loads when torch reads it whole
(a file cut short does not: the zip directory torch needs sits at its end), with a warning that it was not
verified: refusing it would force retraining every existing model. A file whose own contents say it was written
with a hash (``content_hash`` in the dict) but that has lost its trailer is cut short, and refused.
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from .config import NeRSembleConfig
from .losses import nersemble_losses
from .model import NeRSembleModel
from .optim import build_lr_scheduler, build_optimizer, choose_fused, denormals_flushed

CHECKPOINT_FORMAT = 1
_HASH_TAG = b"NERSEMBLE-SHA256"  # then 32 bytes of SHA-256 over everything before the tag
_HASHED_KEY = "content_hash"  # True in every checkpoint written with the trailer
UNVERIFIED = "written before checksums; not verified (loaded as it is)"


class CheckpointError(ValueError):
    """A checkpoint file that is cut short, corrupt or not a checkpoint; the message names the file."""


@dataclass(frozen=True)
class TrainView:
    """One training camera: metric OpenCV ``K`` and ``world_2_cam`` for ``width`` x ``height`` frames."""

    K: np.ndarray
    world_2_cam: np.ndarray
    width: int
    height: int


@dataclass
class TrainImage:
    """One (camera, timestep) target: RGB uint8 (H, W, 3), alpha uint8 (H, W) or None, z-depth metres or None."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    depth: np.ndarray | None = None


class ImageSource(Protocol):
    """Where training images come from (the capture store in the pipeline, arrays in tests)."""

    views: list[TrainView]
    n_timesteps: int

    def load(self, view: int, timestep: int) -> TrainImage: ...


@dataclass(frozen=True)
class TrainingProgress:
    """What a progress callback sees every ``progress_every`` steps (and at the end)."""

    step: int  # steps done so far
    total_steps: int
    losses: dict[str, float]
    psnr: float | None  # of the last batch's rays (on white), not a hold-out figure
    rays_per_s: float
    elapsed_s: float
    eta_s: float | None
    samples_per_ray: float = 0.0
    rays_per_step: float = 0.0  # mean over the steps since the last report


ProgressCallback = Callable[[TrainingProgress], None]


class ImageCache:
    """``count`` (view, timestep) images as tensors on the training device, redrawn on request."""

    def __init__(self, source: ImageSource, count: int, world_scale: float, depth_range_m: tuple[float, float],
                 device: torch.device, generator: torch.Generator, pairs: list[int] | None = None) -> None:
        self.source, self.count, self.device, self.generator = source, count, device, generator
        self.world_scale, self.depth_range_m = world_scale, depth_range_m
        self.K = torch.as_tensor(np.stack([v.K for v in source.views]), dtype=torch.float32, device=device)
        w2c = torch.as_tensor(np.stack([v.world_2_cam for v in source.views]), dtype=torch.float32, device=device)
        self.rotation = w2c[:, :3, :3]
        self.origin = -torch.einsum("cji,cj->ci", self.rotation, w2c[:, :3, 3]) * world_scale
        self.refresh(pairs)

    def refresh(self, pairs: list[int] | None = None) -> None:
        """Draw ``count`` new (view, timestep) pairs uniformly (with replacement, as random batches do).

        ``pairs`` (``view * n_timesteps + t``) reloads a given set instead: a resumed run continues with the
        images the interrupted one had, so resuming is exact.
        """
        n_views, n_t = len(self.source.views), self.source.n_timesteps
        if pairs is None:
            pairs = torch.randint(0, n_views * n_t, (self.count,), generator=self.generator).tolist()
        self.pairs = list(pairs)
        rgb, alpha, depth, views, times, widths = [], [], [], [], [], []
        for pair in self.pairs:
            view, t = divmod(pair, n_t)
            image = self.source.load(view, t)
            h, w = image.rgb.shape[:2]
            a = image.alpha if image.alpha is not None else np.full((h, w), 255, np.uint8)
            d = image.depth if image.depth is not None else np.zeros((h, w), np.float32)
            lo, hi = self.depth_range_m
            d = np.where((d >= lo) & (d <= hi), d, 0.0).astype(np.float32)
            rgb.append(torch.from_numpy(np.ascontiguousarray(image.rgb)).reshape(-1, 3))
            alpha.append(torch.from_numpy(np.ascontiguousarray(a)).reshape(-1))
            depth.append(torch.from_numpy(d).reshape(-1))
            views.append(view)
            times.append(t)
            widths.append(w)
            self.has_alpha = image.alpha is not None
            self.has_depth = image.depth is not None
        self.rgb = torch.cat(rgb).to(self.device)
        self.alpha = torch.cat(alpha).to(self.device)
        self.depth = torch.cat(depth).to(self.device)
        # Per image, not per pixel: a ray's image is found from its index among the concatenated pixels, which
        # keeps the cache at the images' own bytes (per-pixel view, time and pixel indices cost 32 bytes a pixel).
        counts = torch.tensor([r.shape[0] for r in rgb])
        self.image_start = (torch.cumsum(counts, 0) - counts).to(self.device)
        self.image_view = torch.tensor(views, dtype=torch.long, device=self.device)
        self.image_time = torch.tensor(times, dtype=torch.long, device=self.device)
        self.image_width = torch.tensor(widths, dtype=torch.long, device=self.device)

    def sample(self, n_rays: int) -> dict[str, torch.Tensor]:
        """A uniform ray batch: origins/directions in model units, targets on white, depth as distance."""
        idx = torch.randint(0, self.rgb.shape[0], (n_rays,), generator=self.generator).to(self.device)
        image = torch.searchsorted(self.image_start, idx, right=True) - 1
        view, pixel, width = self.image_view[image], idx - self.image_start[image], self.image_width[image]
        u = (pixel % width).float() + 0.5
        v = torch.div(pixel, width, rounding_mode="floor").float() + 0.5
        K = self.K[view]
        y = (v - K[:, 1, 2]) / K[:, 1, 1]
        x = (u - K[:, 0, 2] - K[:, 0, 1] * y) / K[:, 0, 0]
        cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)
        cam = cam / torch.linalg.norm(cam, dim=-1, keepdim=True)
        directions = torch.einsum("nj,nji->ni", cam, self.rotation[view])  # R^T d
        alpha = self.alpha[idx].float() / 255.0
        rgb = self.rgb[idx].float() / 255.0
        z = self.depth[idx]
        return {
            "origins": self.origin[view],
            "directions": directions,
            "timesteps": self.image_time[image],
            "rgb": rgb * alpha[:, None] + (1.0 - alpha[:, None]),  # composited on the white background
            "alpha": alpha if self.has_alpha else None,
            # z-depth -> distance along the unit ray, in model units (0 stays "no depth")
            "depth": (z / cam[:, 2] * self.world_scale) if self.has_depth else None,
        }


@dataclass
class TrainerState:
    step: int = 0  # steps done
    history: list[dict[str, float]] = field(default_factory=list)  # one row per progress report
    elapsed_s: float = 0.0  # training time of all sessions, checkpoint writes excluded
    rays: int = 0  # rays trained on so far
    samples_per_ray: float = 0.0  # EMA over recent steps (0 = none yet): sizes sample-budgeted batches


class Trainer:
    """Trains one :class:`NeRSembleModel` on one :class:`ImageSource`; resumable from :meth:`state_dict`."""

    def __init__(self, model: NeRSembleModel, source: ImageSource, device: torch.device,
                 seed: int | None = None) -> None:
        self.model, self.source, self.device = model, source, device
        self.config: NeRSembleConfig = model.config
        cfg = self.config
        self.generator = torch.Generator().manual_seed(cfg.train.seed if seed is None else seed)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg)
        use_amp = cfg.train.mixed_precision and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        self.state = TrainerState()
        self.cache: ImageCache | None = None
        self._resume_pairs: list[int] | None = None
        model.set_training_cameras([v.K for v in source.views], [v.world_2_cam for v in source.views],
                                   [(v.width, v.height) for v in source.views])

    # --- one step -------------------------------------------------------------------------------------

    def _ensure_cache(self) -> ImageCache:
        t = self.config.train
        redraw = self.state.step % (t.repeat_images + 1) == 0
        if self.cache is None:
            pairs = None if redraw else self._resume_pairs
            self.cache = ImageCache(self.source, t.images_per_batch, self.config.scene.world_scale,
                                    self.config.data.depth_range_m, self.device, self.generator, pairs)
        elif redraw:
            self.cache.refresh()
        return self.cache

    def rays_for_next_step(self) -> int:
        """``train.rays_per_batch``, or with a sample budget, the rays that fill it at the recent samples per ray."""
        t, samples_per_ray = self.config.train, self.state.samples_per_ray
        if not t.target_samples_per_batch or samples_per_ray <= 0:
            return t.rays_per_batch
        return int(min(t.max_rays_per_batch, max(t.rays_per_batch, t.target_samples_per_batch / samples_per_ray)))

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns the loss terms, ``psnr`` of the batch, ``samples`` per ray and ``rays``."""
        with denormals_flushed():
            return self._step()

    def _step(self) -> dict[str, float]:
        cfg, step, model = self.config, self.state.step, self.model
        n_rays = self.rays_for_next_step()
        batch = self._ensure_cache().sample(n_rays)
        model.train()
        model.update_occupancy(step, self.generator)
        out = model(batch["origins"], batch["directions"], batch["timesteps"], step=step, generator=self.generator)
        losses = nersemble_losses(out, batch["rgb"], batch["alpha"], batch["depth"], cfg.loss, step)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if cfg.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not self.scaler.is_enabled() or self.scaler.get_scale() >= scale_before:
            self.scheduler.step()  # as upstream: the decay counts only steps the scaler did not skip
        samples_per_ray = len(out["samples"]) / n_rays
        ema = self.state.samples_per_ray
        self.state.samples_per_ray = samples_per_ray if ema <= 0 else 0.9 * ema + 0.1 * samples_per_ray
        self.state.rays += n_rays
        self.state.step += 1
        with torch.no_grad():
            mse = float(torch.mean((out["rgb"].detach().clamp(0, 1) - batch["rgb"]) ** 2))
        row = {k: float(v.detach()) for k, v in losses.items()}
        row["total"] = float(total.detach())
        row["psnr"] = -10.0 * math.log10(max(mse, 1e-10))
        row["samples"] = samples_per_ray
        row["rays"] = float(n_rays)
        return row

    # --- the loop -------------------------------------------------------------------------------------

    def train(self, until_step: int | None = None, time_budget_s: float | None = None,
              progress: ProgressCallback | None = None, progress_every: int = 10,
              checkpoint: Callable[[], None] | None = None, checkpoint_every: int | None = None,
              checkpoint_every_s: float | None = None, should_stop: Callable[[], bool] | None = None) -> str:
        """Train until ``until_step`` steps are done, the time budget is spent or ``should_stop()`` is true.

        Returns why it stopped: ``"steps"``, ``"time budget"`` or ``"interrupted"`` (``should_stop`` is checked
        after every step, so the step in flight always finishes). ``checkpoint`` is called every
        ``checkpoint_every`` steps, every ``checkpoint_every_s`` seconds of wall time, and at the end; its time
        does not count as training time.
        """
        total = until_step if until_step is not None else self.config.train.steps
        start_elapsed, window_rows = self.state.elapsed_s, []
        session_start = time.perf_counter()
        excluded = 0.0  # checkpoint time this session
        reason = "steps"
        last_checkpoint = time.perf_counter()

        def elapsed() -> float:
            return start_elapsed + time.perf_counter() - session_start - excluded

        window_start, window_step = elapsed(), self.state.step
        while self.state.step < total:
            window_rows.append(self.train_step())
            step = self.state.step
            done = step >= total
            over_budget = time_budget_s is not None and elapsed() - start_elapsed >= time_budget_s
            stopping = should_stop is not None and should_stop()
            if step % progress_every == 0 or done or over_budget or stopping:
                now = elapsed()
                rate = (step - window_step) / max(now - window_start, 1e-9)
                row = {k: float(np.mean([r[k] for r in window_rows if k in r])) for k in window_rows[-1]}
                self.state.elapsed_s = now
                self.state.history.append({"step": step, "elapsed_s": now, **row})
                if progress is not None:
                    progress(TrainingProgress(
                        step=step, total_steps=total,
                        losses={k: v for k, v in row.items() if k not in ("psnr", "samples", "rays")},
                        psnr=row["psnr"], rays_per_s=rate * row["rays"], elapsed_s=now,
                        eta_s=(total - step) / rate if rate > 0 else None, samples_per_ray=row["samples"],
                        rays_per_step=row["rays"]))
                window_rows, window_start, window_step = [], now, step
            due = (checkpoint_every and step % checkpoint_every == 0) or (
                checkpoint_every_s is not None and time.perf_counter() - last_checkpoint >= checkpoint_every_s)
            if checkpoint is not None and due and not (done or stopping or over_budget):
                t0 = time.perf_counter()
                self.state.elapsed_s = elapsed()
                checkpoint()
                last_checkpoint = time.perf_counter()
                excluded += last_checkpoint - t0
            if stopping and not done:
                reason = "interrupted"
                break
            if over_budget and not done:
                reason = "time budget"
                break
        self.state.elapsed_s = elapsed()
        if checkpoint is not None:
            checkpoint()
        return reason

    # --- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a resumed run needs; plain types and tensors only (``weights_only`` loadable)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "n_timesteps": self.model.n_timesteps,
            "scene_box": self.model.scene_box.detach().cpu(),
            "step": self.state.step,
            "elapsed_s": self.state.elapsed_s,
            "rays": self.state.rays,
            "samples_per_ray": self.state.samples_per_ray,
            "history": self.state.history,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "cached_images": list(self.cache.pairs) if self.cache is not None else None,
            **(extra or {}),
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        choose_fused(self.optimizer)  # this run's path, not the saving run's
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.generator.set_state(checkpoint["generator"])
        self.state = TrainerState(step=int(checkpoint["step"]), history=list(checkpoint["history"]),
                                  elapsed_s=float(checkpoint["elapsed_s"]), rays=int(checkpoint.get("rays", 0)),
                                  samples_per_ray=float(checkpoint.get("samples_per_ray", 0.0)))
        self.cache = None  # rebuilt at the next step with the same images
        self._resume_pairs = checkpoint.get("cached_images")


def save_checkpoint(checkpoint: dict[str, Any]) -> bytes:
    """The checkpoint's bytes: torch's file, then the tag and the SHA-256 of that file (written last)."""
    buffer = io.BytesIO()
    torch.save({**checkpoint, _HASHED_KEY: True}, buffer)
    payload = buffer.getvalue()
    return payload + _HASH_TAG + hashlib.sha256(payload).digest()


def verify_checkpoint(data: bytes, name: str = "checkpoint") -> tuple[bytes, bool]:
    """(torch payload, verified): verified when the content hash matches; False when there is no hash at all.

    A hash that does not match is a :class:`CheckpointError`; a file without one is only a candidate (an old
    checkpoint, or one cut short) that :func:`load_checkpoint` tells apart by reading it.
    """
    tail = len(_HASH_TAG) + 32
    if len(data) < tail or data[-tail:-32] != _HASH_TAG:
        return data, False
    payload = data[:-tail]
    if hashlib.sha256(payload).digest() != data[-32:]:
        raise CheckpointError(f"{name}: corrupt checkpoint (its content hash does not match: bytes changed on disk)")
    return payload, True


def load_checkpoint(data: bytes, map_location: str | torch.device = "cpu", name: str = "checkpoint",
                    warnings: list[str] | None = None) -> dict[str, Any]:
    """A verified checkpoint from bytes, with weights-only loading (no pickled code runs).

    ``name`` (the file) goes into the :class:`CheckpointError` of a damaged or unreadable checkpoint. A checkpoint
    from before content hashes loads unverified, and says so in ``warnings`` (see the module doc).
    """
    payload, verified = verify_checkpoint(data, name)
    try:
        checkpoint = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - unreadable: say which file, not torch's advice
        if not verified:
            raise CheckpointError(f"{name}: not a complete checkpoint (no content hash at its end and unreadable: "
                                  f"cut short, or not written by this pipeline)") from None
        raise CheckpointError(f"{name}: cannot be read as a checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{name}: not a checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    if not verified:
        if checkpoint.get(_HASHED_KEY):
            raise CheckpointError(f"{name}: not a complete checkpoint (written with a content hash that is gone: "
                                  f"cut short)")
        if warnings is not None:
            warnings.append(f"{name}: {UNVERIFIED}")
    checkpoint.pop(_HASHED_KEY, None)
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], device: torch.device | str = "cpu",
                          backend: str = "auto", eval_substeps: int | None = None) -> NeRSembleModel:
    """Rebuild the trained model (eval mode) from a checkpoint's config, box and weights.

    ``eval_substeps`` replaces the trained config's render step (``sampler.eval_substeps``): the weights do not
    depend on it, so a render may trade time for accuracy after training.
    """
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown checkpoint format {checkpoint.get('format')!r}")
    config = NeRSembleConfig.from_dict(checkpoint["config"])
    if eval_substeps is not None:
        config = config.with_overrides({"sampler.eval_substeps": eval_substeps})
    model = NeRSembleModel(config, int(checkpoint["n_timesteps"]), checkpoint["scene_box"], backend=backend)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()
