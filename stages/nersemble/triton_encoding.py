"""The ``triton`` hash-ensemble backend: fused Triton kernels over the torch backend's ``table`` parameter.

:class:`TritonHashEnsemble` subclasses :class:`~stages.nersemble.hash_encoding.TorchHashEnsemble` and adds
nothing to its state: same ``table[E, K*F]`` parameter, same (non-persistent) level buffers, so a state_dict or
a checkpoint moves between the two backends unchanged (and to tcnn through ``TcnnHashEnsemble.load_table``).

Why it is faster than the torch backend on a GPU: torch materialises per-sample, per-level corner indices
and weights (``[L, N, 8]`` int64 and float) and then gathers; here each program computes indices and weights
in registers, gathers the 8 corner rows and blends the K grids before writing only ``[N, L*F]``. The
backward recomputes the same indices instead of saving them, and produces all three gradients (table,
positions, blend weights) in one pass.

Table gradient: dense, filled by atomic adds. The trainer's optimiser is ``torch.optim.Adam`` over a
dense parameter, as upstream's (it decays the moments of untouched rows too), so a sparse gradient would
need another optimiser with other semantics, or a fused update of touched rows that changes the method.
A dense buffer costs one memset of the table's size per step, which a GPU does at memory bandwidth (a small
share of the step next to Adam's own pass over table, gradient and moments), and lets every sample add
its ``w_c * G`` straight into its rows: no index list, no sort, no ``index_add_`` over ``8*L*N`` rows.
Atomics collide mostly on the coarse dense levels, where tcnn's backward collides in the same way.

On CPU tensors the module falls back to the inherited torch path (the same function), so a model built
for ``triton`` still renders after ``.cpu()``; ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors instead
(the tests). ``grid_features`` (unblended features, diagnostics only) is always the torch path.
"""

from __future__ import annotations

import torch

from . import triton_kernels
from .config import HashEnsembleConfig
from .hash_encoding import TorchHashEnsemble

# Points per program: a tile of BLOCK_N x (K_PAD * F_PAD) values, about 2048 lanes (16 per thread at 4
# warps) keeps the 8 gathered corner tiles and the accumulators in registers at the paper's 64 features.
TILE_LANES = 2048
MAX_BLOCK_N = 128


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_points(n_grids: int, features: int, tile_lanes: int = TILE_LANES) -> int:
    """Points per program for a ``K x F`` ensemble (a power of two, at least 16)."""
    lanes = _next_pow2(n_grids) * _next_pow2(features)
    return max(16, min(MAX_BLOCK_N, tile_lanes // lanes))


def interpreting() -> bool:
    """The kernels were built by Triton's interpreter (``TRITON_INTERPRET=1`` at import): they take CPU tensors."""
    return type(triton_kernels.hash_ensemble_fwd).__name__ == "InterpretedFunction"


class LevelTables:
    """The per-level geometry the kernels read, as small device tensors (float32 / int32 / int64)."""

    def __init__(self, encoding: TorchHashEnsemble, device: torch.device) -> None:
        layout = encoding.layout
        self.scales = torch.tensor(layout.scales, dtype=torch.float32, device=device)
        self.resolutions = torch.tensor(layout.resolutions, dtype=torch.int32, device=device)
        self.sizes = torch.tensor(layout.sizes, dtype=torch.int32, device=device)
        self.offsets = torch.tensor(layout.offsets, dtype=torch.int64, device=device)
        self.dense = torch.tensor(layout.dense, dtype=torch.int32, device=device)

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.scales, self.resolutions, self.sizes, self.offsets, self.dense


class _HashEnsembleFunction(torch.autograd.Function):
    """``(x[N, 3], blend[N, K], table[E, K*F]) -> [N, L*F]`` through the Triton kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blend: torch.Tensor, table: torch.Tensor, levels: LevelTables,
                n_grids: int, features: int, block_n: int) -> torch.Tensor:
        x32 = x.detach().float().contiguous()
        blend32 = blend.detach().float().contiguous()
        n, n_levels = x32.shape[0], levels.scales.shape[0]
        out = torch.empty(n, n_levels * features, dtype=table.dtype, device=x.device)
        if n:
            grid = (triton_kernels_grid(n, block_n), n_levels)
            triton_kernels.hash_ensemble_fwd[grid](
                x32, blend32, table.detach(), out, *levels.args(), n,
                K=n_grids, F=features, L=n_levels, K_PAD=_next_pow2(n_grids), F_PAD=_next_pow2(features),
                BLOCK_N=block_n)
        ctx.save_for_backward(x32, blend32, table)
        ctx.levels, ctx.n_grids, ctx.features, ctx.block_n = levels, n_grids, features, block_n
        ctx.x_dtype, ctx.blend_dtype = x.dtype, blend.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x32, blend32, table = ctx.saved_tensors
        need_x, need_blend, need_table = ctx.needs_input_grad[:3]
        n, n_levels = x32.shape[0], ctx.levels.scales.shape[0]
        device = x32.device
        grad_x = torch.zeros(n, 3, dtype=torch.float32, device=device) if need_x else None
        grad_blend = torch.zeros(n, ctx.n_grids, dtype=torch.float32, device=device) if need_blend else None
        grad_table = torch.zeros_like(table) if need_table else None
        if n and (need_x or need_blend or need_table):
            dummy = x32  # never written: the kernel's constexpr flags skip the unused outputs
            triton_kernels.hash_ensemble_bwd[(triton_kernels_grid(n, ctx.block_n),)](
                x32, blend32, table.detach(), grad_out.contiguous(),
                dummy if grad_x is None else grad_x, dummy if grad_blend is None else grad_blend,
                dummy if grad_table is None else grad_table, *ctx.levels.args(), n,
                K=ctx.n_grids, F=ctx.features, L=n_levels, K_PAD=_next_pow2(ctx.n_grids),
                F_PAD=_next_pow2(ctx.features), BLOCK_N=ctx.block_n,
                NEED_X=need_x, NEED_BLEND=need_blend, NEED_TABLE=need_table)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_blend is not None:
            grad_blend = grad_blend.to(ctx.blend_dtype)
        return grad_x, grad_blend, grad_table, None, None, None, None


def triton_kernels_grid(n_points: int, block_n: int) -> int:
    return -(-n_points // block_n)


def hash_ensemble_triton(x: torch.Tensor, blend: torch.Tensor, table: torch.Tensor, levels: LevelTables,
                         n_grids: int, features: int, block_n: int | None = None) -> torch.Tensor:
    """The blended encoding ``[N, L*F]`` of ``x[N, 3]`` in [0, 1] with per-grid weights ``blend[N, K]``."""
    block_n = block_n or block_points(n_grids, features)
    return _HashEnsembleFunction.apply(x, blend, table, levels, n_grids, features, block_n)


class TritonHashEnsemble(TorchHashEnsemble):
    """Drop-in for :class:`TorchHashEnsemble` (same parameter and state_dict) whose forward runs on Triton."""

    def __init__(self, config: HashEnsembleConfig, table: torch.nn.Parameter | None = None,
                 block_n: int | None = None) -> None:
        super().__init__(config, table)
        self.block_n = block_n or block_points(self.n_grids, self.features_per_level)
        self._levels: LevelTables | None = None

    def _level_tables(self, device: torch.device) -> LevelTables:
        if self._levels is None or self._levels.scales.device != device:
            self._levels = LevelTables(self, device)
        return self._levels

    def uses_kernels(self, x: torch.Tensor) -> bool:
        """Kernels run on CUDA tensors, and on CPU tensors only under Triton's interpreter."""
        return x.is_cuda or interpreting()

    def forward(self, x: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernels(x):
            return super().forward(x, blend)
        if x.shape[-1] != 3 or blend.shape != (x.shape[0], self.n_grids):
            raise ValueError(f"expected x [N, 3] and blend [N, {self.n_grids}], got {tuple(x.shape)} and "
                             f"{tuple(blend.shape)}")
        return hash_ensemble_triton(x, blend, self.table, self._level_tables(x.device), self.n_grids,
                                    self.features_per_level, self.block_n)
