"""The training loop: optimisation steps on rays from an image cache, progress reports, resumable state.

The loop only needs an :class:`~.image_cache.ImageSource` (cameras plus ``load(view, timestep)``), so it knows
nothing about zarr or the work folder; ``stages/optimize`` adapts the capture store to it. Rays come from an
:class:`~.image_cache.ImageCache` of ``train.images_per_batch`` images, redrawn every ``train.repeat_images + 1``
steps (see ``image_cache``).

:meth:`Trainer.state_dict` is what goes into a checkpoint; the file format itself (content hash, verification,
rebuilding a model for rendering) is ``checkpoint``'s, so readers of a trained model never import the loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .checkpoint import CHECKPOINT_FORMAT
from .config import NeRSembleConfig
from .image_cache import ImageCache, ImageSource
from .losses import nersemble_losses
from .model import NeRSembleModel
from .optim import build_lr_scheduler, build_optimizer, choose_fused, denormals_flushed


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


@dataclass
class TrainerState:
    """Where training stands, beyond the weights and optimiser: saved in every checkpoint so a resumed run
    reports, budgets and sizes its batches as if it had never stopped."""

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
        """Resume from a :meth:`state_dict` (as ``checkpoint.load_checkpoint`` returns it): the next step draws the
        same images and random numbers the interrupted run would have."""
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
