"""The compile gate: compile a :class:`~.launch.Launch` for a real NVIDIA target, no GPU needed.

Triton's interpreter runs the kernels on the CPU for the value tests, but it accepts code the real compiler
rejects. Here each launch goes through what a real launch does before it reaches the driver: Triton's own binder
types and specialises the very arguments the op built (``*fp32``, ``i32``, constexprs, 16-byte alignment), then
``triton.compile`` lowers it for a :class:`GPUTarget` down to a cubin with the ptxas that ships in the triton
wheel. Registers and spills come from running that ptxas again with ``-v`` on the PTX (Triton discards its log);
shared memory is the compiler's own figure.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from .launch import Launch

# Ampere (A100), Ampere (RTX 30xx, A10), Ada (L4, RTX 40xx), Hopper (H100/H200); Blackwell where the wheel's
# ptxas knows it (data-centre B200 and consumer RTX 50xx).
TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
BLACKWELL_TARGETS = {"sm_100": 100, "sm_120": 120}


@dataclass
class Compiled:
    """One kernel variant compiled for one target; ``error`` is the compiler's message when it failed."""

    kernel: str
    variant: str
    target: str
    ok: bool
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    num_warps: int | None = None
    seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def gpu_target(capability: int) -> GPUTarget:
    return GPUTarget("cuda", capability, 32)


def ptxas_path(capability: int) -> str:
    """The ptxas the triton wheel ships for ``capability`` (its Blackwell build from sm_90 on, as Triton picks)."""
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415 - only present with the CUDA backend

    return get_ptxas(capability).path


def arch_name(capability: int) -> str:
    from triton.backends.nvidia.compiler import sm_arch_from_capability  # noqa: PLC0415

    return sm_arch_from_capability(capability)


def supported_targets() -> dict[str, int]:
    """The targets above that this triton's ptxas can build: Blackwell only where it lists the architecture."""
    targets = dict(TARGETS)
    for name, capability in BLACKWELL_TARGETS.items():
        try:
            listing = subprocess.run([ptxas_path(capability), "--help"], capture_output=True, text=True,
                                     timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if arch_name(capability) in listing or name in listing:
            targets[name] = capability
    return targets


def resource_usage(ptx: str, capability: int) -> tuple[int, int, int]:
    """Registers, spill-store bytes and spill-load bytes of the PTX's kernel, by ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas_path(capability), "-v", "--regAllocOptLevel=2",
                                 f"--gpu-name={arch_name(capability)}", str(source), "-o", str(Path(tmp) / "k.o")],
                                capture_output=True, text=True, timeout=300)
    log = result.stderr + result.stdout
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"could not read ptxas -v output: {log.strip()[:300]}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_launch(launch: Launch, capability: int, variant: str = "") -> Compiled:
    """Compile ``launch`` for ``sm_<capability>`` as a real launch would; never raises for a compiler error."""
    kernel = launch.kernel
    target_name = f"sm_{capability}"
    start = time.perf_counter()
    try:
        target = gpu_target(capability)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*launch.args, **launch.constexprs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, launch.constexprs, bound,
                                                                  specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        registers, spill_stores, spill_loads = resource_usage(compiled.asm["ptx"], capability)
    except Exception as error:  # noqa: BLE001 - the gate reports every failure, whatever raised it
        lines = str(error).strip().splitlines()
        message = f"{type(error).__name__}: " + " | ".join(line.strip() for line in lines[-6:] if line.strip())
        return Compiled(launch.name, variant, target_name, False, seconds=time.perf_counter() - start,
                        error=message[:1500])
    return Compiled(launch.name, variant, target_name, True, registers, spill_stores, spill_loads,
                    compiled.metadata.shared, compiled.metadata.num_warps, time.perf_counter() - start)
