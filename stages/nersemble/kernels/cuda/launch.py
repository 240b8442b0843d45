"""Launching Triton kernels: each launch is a :class:`Launch` record, run in one place.

Describing a launch before running it serves two ends. The compile gate (:mod:`.compile`) compiles exactly the
launches the ops build, for real NVIDIA targets on a machine without a GPU, so no hand-kept signature can drift
from the code. And a compile or launch failure becomes one :class:`KernelError` that names the kernel, the
device and the compiler's message, which the model turns into a fallback (``auto``) or an error (explicit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..registry import KernelError


def interpreting(kernel: Any) -> bool:
    """``kernel`` was built by Triton's interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def device_target(tensor: torch.Tensor) -> str:
    """The device a kernel runs on, in words: GPU name and ``sm_XY``, or the interpreter on the CPU."""
    if tensor.is_cuda:
        major, minor = torch.cuda.get_device_capability(tensor.device)
        return f"{torch.cuda.get_device_name(tensor.device)} (sm_{major}{minor})"
    return f"{tensor.device.type} (Triton interpreter)"


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the kernel, its grid, positional arguments and constexpr keyword arguments."""

    kernel: Any  # a triton JITFunction (or the interpreter's)
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def run(self) -> None:
        """Compile (first time) and launch; any failure is a :class:`KernelError` naming this kernel."""
        try:
            self.kernel[self.grid](*self.args, **self.constexprs)
        except Exception as error:  # noqa: BLE001 - a compiler, driver or launch error, whichever it is
            tensor = next(a for a in self.args if isinstance(a, torch.Tensor))
            raise KernelError(self.name, device_target(tensor), error) from error
