"""Random draws that honour an optional ``torch.Generator`` living on another device than the data."""

from __future__ import annotations

import torch


def rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(0, 1) of ``shape`` on ``device``, drawn from ``generator`` (on its own device) when given."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def randint(high: int, shape: tuple[int, ...], device: torch.device,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Integers in [0, high) of ``shape`` on ``device``, drawn from ``generator`` when given."""
    if generator is None:
        return torch.randint(high, shape, device=device)
    return torch.randint(high, shape, generator=generator, device=generator.device).to(device)
