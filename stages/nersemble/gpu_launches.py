"""The Triton launches the model makes at each preset, built by the ops' own launch functions.

The compile gate (``tests/nersemble/test_gpu_compile.py``, ``benchmarks/gpu_compile.py``) compiles each of these
for real NVIDIA targets without a GPU. Nothing here restates a signature: the encoding module is built for the
preset (on the meta device, so the paper's 1.6 GB table costs nothing) and hands its own level tables and block
size to the same ``*_launch`` functions its autograd op calls, on tensors of the dtypes training passes; the
compiler then types and specialises those arguments as a real launch does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import NeRSembleConfig, preset
from .hash_encoding import TritonHashEnsemble
from .kernels.cuda import hash_encoding as hash_kernels
from .kernels.cuda import packed
from .kernels.cuda.launch import Launch

META = torch.device("meta")
# Samples per launch: any count not a multiple of 16 takes the generic integer specialisation.
N_SAMPLES = 262_145
N_RAYS = 4_097


@dataclass(frozen=True)
class PresetLaunch:
    preset: str
    variant: str  # what in training makes this launch, e.g. "backward x+blend+table"
    launch: Launch


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META)


def encoding_launches(config: NeRSembleConfig) -> Iterator[tuple[str, Launch]]:
    """Forward, and backward for each set of inputs that need gradients in training: the table always, the
    positions when a deformation field moves them, the blend weights once the ensemble window opens."""
    with META:
        encoding = TritonHashEnsemble(config.hash)
    levels = encoding._level_tables(META)
    k, f = encoding.n_grids, encoding.features_per_level
    x, blend = _meta(N_SAMPLES, 3), _meta(N_SAMPLES, k)
    launch, out, x32, blend32 = hash_kernels.forward_launch(x, blend, encoding.table, levels, k, f, encoding.block_n)
    yield "forward", launch
    for need_blend in (False, True):
        needs = (config.deformation.enabled, need_blend, True)
        launch, _ = hash_kernels.backward_launch(x32, blend32, encoding.table, torch.empty_like(out), levels, k, f,
                                                 hash_kernels.backward_block_points(k, f), needs)
        names = [name for name, need in zip(("x", "blend", "table"), needs, strict=True) if need]
        yield "backward " + "+".join(names), launch


def packed_launches(config: NeRSembleConfig) -> Iterator[tuple[str, Launch]]:
    """Compositing forward and backward over float32 samples, and the marcher's count and write passes over the
    preset's occupancy grid."""
    counts = _meta(N_RAYS, dtype=torch.int64)
    sigmas, rgbs, t_starts = _meta(N_SAMPLES), _meta(N_SAMPLES, 3), _meta(N_SAMPLES)
    launch, outputs = packed.composite_forward_launch(sigmas, rgbs, t_starts, t_starts, counts, counts)
    yield "composite forward", launch
    weights, transmittance, accumulation, rgb_sum, depth_sum = outputs
    saved = (sigmas, rgbs, t_starts, t_starts, counts, counts, weights, transmittance)
    launch, _, _ = packed.composite_backward_launch(saved, weights, accumulation, rgb_sum, depth_sum)
    yield "composite backward", launch
    r = config.occupancy.resolution
    box = _meta(2, 3)
    inputs = packed.march_inputs(_meta(N_RAYS, 3), _meta(N_RAYS, 3), _meta(N_RAYS), counts, counts, 0.01, box,
                                 _meta(r, r, r, dtype=torch.bool))
    yield "march count", packed.march_launch(*inputs, counts)
    yield "march write", packed.march_launch(*inputs, counts, (counts, counts, _meta(N_SAMPLES)))


def preset_launches(names: tuple[str, ...] = ("preview", "standard", "paper")) -> list[PresetLaunch]:
    """Every Triton launch of every preset in ``names``."""
    launches = []
    for name in names:
        config = preset(name)
        for variant, launch in (*encoding_launches(config), *packed_launches(config)):
            launches.append(PresetLaunch(name, variant, launch))
    return launches
