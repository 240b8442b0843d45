"""Which hash-encoding backend ``--encoding`` names on a device, for training and rendering alike.

Training (``stages/optimize``) and reading a trained model (``stages/rendering.model``, for export, evaluate and
the viewer) must resolve ``auto`` the same way and refuse the same impossible choices, so the rule lives once,
in the shared room below both. The messages name the ``optimize`` option because that is where users meet it.
"""

from __future__ import annotations

import torch

from stages.core.errors import PipelineError
from stages.nersemble.kernels.registry import auto_backend, tcnn_available, triton_importable


def resolve_backend(encoding: str, device: torch.device | str | None = None) -> str:
    """The hash-encoding backend ``--encoding`` names on ``device`` (None: CUDA when torch sees a GPU).

    auto: tcnn when it imports, else triton on CUDA, else torch. An explicit choice that cannot run here is
    an error naming what is missing and the fallback.
    """
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if encoding == "auto":
        return auto_backend("cuda" if on_cuda else "cpu")
    if encoding == "tcnn" and not tcnn_available():
        raise PipelineError("optimize --encoding tcnn: tinycudann does not import here (it needs CUDA and is "
                            "not on the package index); use --encoding torch or auto")
    if encoding == "triton" and not triton_importable():
        raise PipelineError("optimize --encoding triton: the triton package does not import here (pip install "
                            "triton; CUDA builds of torch bring it along); use --encoding torch or auto")
    if encoding == "triton" and not on_cuda:
        raise PipelineError(f"optimize --encoding triton: needs a CUDA GPU, and the device here is "
                            f"{'cpu' if device is None else torch.device(device)} (torch.cuda.is_available() = "
                            f"{torch.cuda.is_available()}); use --encoding torch or auto")
    return encoding
