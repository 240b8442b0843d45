"""``--device auto|cpu|cuda`` and torch's thread count, handled the same way by every torch stage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from stages.core.errors import PipelineError


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


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Set torch's intra-op threads for a block (0 keeps the default): on a shared 2-core machine more threads
    than free cores makes small ops many times slower."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
