"""Step schedules and cosine windows: the two warm-up mechanisms NeRSemble relies on.

Both the deformation field's positional encoding and the hash ensemble are faded in with the same cosine
window (Nerfies' ``posenc_window``) driven by a linear ramp over training steps, so they share this module.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """A linear ramp from ``init`` to ``final`` over steps ``[begin, end]`` (NeRSemble's GenericScheduler).

    ``value(None)`` is the final value: the official scheduler object is created at its final value and only
    updated during training, so evaluation and rendering of a loaded model always see the end of the ramp.
    """

    init: float
    final: float
    begin: int
    end: int

    def __post_init__(self) -> None:
        if self.end < self.begin:
            raise ValueError(f"schedule ends ({self.end}) before it begins ({self.begin})")

    def value(self, step: int | None) -> float:
        if step is None or step > self.end:
            return float(self.final)
        if step < self.begin or self.end == self.begin:
            # end == begin: a step function that switches after `end` (step > end above).
            return float(self.init)
        return float(self.init + (self.final - self.init) * (step - self.begin) / (self.end - self.begin))

    def scaled(self, factor: float) -> Schedule:
        """The same ramp with its step range compressed by ``factor`` (used to derive short presets)."""
        return Schedule(self.init, self.final, round(self.begin * factor), round(self.end * factor))


def cosine_window(alpha: float, n: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights ``0.5 (1 - cos(pi clamp(alpha - k, 0, 1)))`` for k = 0..n-1.

    Band k is off while alpha <= k and fully on once alpha >= k + 1, so a ramp of alpha from 0 to n opens
    the bands one after the other. The tensor is shared between calls with the same arguments (read it,
    never write it): a training step asks for the same few windows a dozen times, seven small ops each.
    """
    return _cosine_window(float(alpha), int(n), torch.device(device or "cpu"), dtype)


@functools.lru_cache(maxsize=64)
def _cosine_window(alpha: float, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable by later autograd-recorded ops
        k = torch.arange(n, device=device, dtype=dtype)
        return 0.5 * (1.0 - torch.cos(math.pi * torch.clamp(alpha - k, 0.0, 1.0)))
