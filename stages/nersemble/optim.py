"""Adam over the model's three parameter groups, each with its own StepLR decay."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .config import NeRSembleConfig
from .kernels.cpu import build as cpu_build
from .model import NeRSembleModel


def build_optimizer(model: NeRSembleModel, config: NeRSembleConfig | None = None) -> torch.optim.Adam:
    """Adam (eps 1e-15, no weight decay) over ``model.param_groups``, fused where :func:`choose_fused` says."""
    o = (config or model.config).optim
    optimizer = torch.optim.Adam(model.param_groups(config), betas=o.betas, eps=o.adam_eps,
                                 weight_decay=o.weight_decay)
    return choose_fused(optimizer)


def choose_fused(optimizer: torch.optim.Adam) -> torch.optim.Adam:
    """Run each group with torch's fused Adam on the CPU fast path, the plain one elsewhere.

    The hash tables are most of the parameters and the CPU's Adam makes one pass over them per elementwise op;
    the fused kernel makes one in all, with the same update up to float rounding. The reference path
    (``NERSEMBLE_FAST=0``) keeps the plain Adam as its twin. Call it again after ``load_state_dict``, which
    restores the saving run's choice.
    """
    for group in optimizer.param_groups:
        on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in group["params"])
        group["fused"] = True if cpu_build.requested() and on_cpu else None
    return optimizer


@contextlib.contextmanager
def denormals_flushed() -> Iterator[None]:
    """Flush denormal floats to zero on this thread for the block (a training step), then turn it off again.

    Adam's moments of hash-table rows that no sample reaches decay by beta each step, and on their way to zero
    they pass through the denormal range, where a CPU takes a slow microcode assist on every operation that
    reads one: on a trained model that made the optimiser's pass over the tables several times slower, in
    both paths. Values that small change no update (a moment of 1e-38 against eps 1e-15). Only the calling
    thread's mode is set: intra-op threads torch started before keep theirs. A CPU without the flush-to-zero
    mode runs the block unchanged.
    """
    flushed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: NeRSembleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """StepLR per group: lr = lr0 * gamma_group ** (n // lr_step_size), n = scheduler steps taken.

    Upstream steps it once per iteration but only when the GradScaler did not just lower its scale, so the
    decay counts successful steps; the trainer should do the same.
    """
    o = config.optim
    gammas = {"fields": o.gamma_fields, "deformation_field": o.gamma_deformation, "embeddings": o.gamma_embeddings}

    def decay(gamma: float):
        return lambda n: gamma ** (n // o.lr_step_size)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [decay(gammas[g["name"]]) for g in optimizer.param_groups])
