"""``--device auto|cpu|cuda`` resolved the same way by every torch stage."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def resolve_device(device: str, stage: str) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU; asking for CUDA without one is an error, not a silent fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{stage} --device cuda: torch sees no CUDA device here (CPU-only build or no GPU); "
                            "use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise PipelineError(f"{stage} --device {device!r}: choose auto, cpu or cuda")
    return torch.device(device)
