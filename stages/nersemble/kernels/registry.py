"""Which kernels run where: what ``auto`` means on which device, and the one error a kernel failure raises.

| device | hash encoding (``auto``) | marching + compositing | SE(3) warp, no-grad query |
| --- | --- | --- | --- |
| CPU, float32 | torch module, C kernels inside (:mod:`.cpu`) | C marcher, torch compositing | C (:mod:`.cpu`) |
| CUDA | tcnn where it imports, else Triton (:mod:`.cuda`) | Triton with the ``triton`` encoding | torch |
| anything else | torch | torch | torch |

Every kernel has a torch twin that is the reference; a kernel that cannot build (C) or compile and launch
(Triton) on first use falls back to that twin with one warning under ``auto``, and fails with the same
message when the backend was asked for by name. Nothing here imports the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

ENCODINGS = ("auto", "torch", "triton", "tcnn")


class KernelError(RuntimeError):
    """A kernel failed to compile, launch or match its torch twin on first use."""

    def __init__(self, kernel: str, target: str, error: BaseException | str) -> None:
        self.kernel, self.target = kernel, target
        lines = str(error).strip().splitlines() or [type(error).__name__]
        # The compiler's own first line names the cause; a whole MLIR dump would bury it.
        self.reason = f"{type(error).__name__}: {lines[0]}" if isinstance(error, BaseException) else lines[0]
        super().__init__(f"Triton kernel {kernel} failed on {target}: {self.reason[:400]}")


def fall_back(error: KernelError, strict: bool, instead: str = "the torch twin") -> str:
    """An explicit backend re-raises; ``auto`` warns once per failure and says what runs instead."""
    if strict:
        raise KernelError(error.kernel, error.target,
                          f"{error.reason}; use --encoding torch (or auto, which falls back by itself)") from error
    message = f"{error}; continuing on {instead}"
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return message


def tcnn_available() -> bool:
    """tinycudann imports and a CUDA device exists (tcnn has no CPU path)."""
    if not torch.cuda.is_available():
        return False
    try:
        import tinycudann  # noqa: F401, PLC0415
    except Exception:  # ImportError, or an OSError from a build that does not match the driver
        return False
    return True


def triton_importable() -> bool:
    """The ``triton`` package imports (it does not say whether a GPU is there to run it)."""
    try:
        import triton  # noqa: F401, PLC0415
    except Exception:  # ImportError, or a broken install
        return False
    return True


def triton_available() -> bool:
    """Triton imports and a CUDA device exists: Triton kernels can run compiled here."""
    return torch.cuda.is_available() and triton_importable()


def auto_backend(device: torch.device | str | None = None) -> str:
    """What ``auto`` means on ``device`` (None: the default CUDA device when there is one, else the CPU).

    tcnn when it imports, else triton (both need CUDA), else torch (whose float32 CPU path runs the C kernels).
    """
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_cuda and tcnn_available():
        return "tcnn"
    if on_cuda and triton_available():
        return "triton"
    return "torch"


def check_twin(name: str, op: Callable[..., torch.Tensor], twin: Callable[..., torch.Tensor],
               inputs: list[torch.Tensor], target: str, tolerance: float = 1e-3) -> None:
    """Run ``op`` and its torch ``twin`` on ``inputs``, forward and (for inputs that require it) backward, and
    raise a :class:`KernelError` when the op fails or its values or gradients differ beyond ``tolerance``
    (relative to the largest magnitude; a kernel that computes the wrong thing is off by O(1)). Autocast is off
    inside: the first use may come in a mixed-precision step, and an fp16 twin would differ by its own rounding."""
    with torch.autocast(device_type=inputs[0].device.type, enabled=False):
        out = op(*inputs)
        expected = twin(*inputs)
    pairs = [(out, expected, "values")]
    wanted = [t for t in inputs if t.requires_grad]
    if wanted:
        grad_out = torch.ones_like(out)
        pairs += zip(torch.autograd.grad(out, wanted, grad_out), torch.autograd.grad(expected, wanted, grad_out),
                     [f"gradient {i}" for i in range(len(wanted))], strict=True)
    for got, want, what in pairs:
        if got.shape != want.shape:
            raise KernelError(name, target, f"its {what} have shape {tuple(got.shape)}, the torch twin's "
                              f"{tuple(want.shape)}")
        scale = max(float(want.detach().abs().max()) if want.numel() else 0.0, 1e-6)
        error = float((got.detach().float() - want.detach().float()).abs().max()) if want.numel() else 0.0
        if not error <= tolerance * scale:  # also catches NaN
            raise KernelError(name, target, f"its {what} differ from the torch twin's by {error:.3g} "
                              f"(largest value {scale:.3g})")
