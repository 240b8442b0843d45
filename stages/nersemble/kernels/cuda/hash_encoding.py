"""Triton kernels of the hash-ensemble encoding (forward and backward) and the autograd op over them.

Layout is the torch backend's: one ``table[E, W]`` (W = K grids x F features, row-major), tcnn's per-level
offsets, sizes, dense-or-hashed indexing and uint32 arithmetic (:mod:`stages.nersemble.hash_encoding`).
A program owns ``BLOCK_N`` points; its tile is ``[BLOCK_N, K_PAD * F_PAD]`` with lane ``j`` holding grid
``j // F_PAD`` and feature ``j % F_PAD`` (padding lanes masked), so the blend is an elementwise product and
the sum over grids one reshape-and-reduce, for any K and F.

Why it is faster than the torch twin (``TorchHashEnsemble.reference_forward``) on a GPU: torch materialises
per-sample, per-level corner indices and weights (``[L, N, 8]`` int64 and float) and then gathers; here each
program computes indices and weights in registers, gathers the 8 corner rows and blends the K grids before
writing only ``[N, L*F]``. The backward recomputes the same indices instead of saving them, and produces all
three gradients (table, positions, blend weights) in one pass.

Table gradient: dense, filled by atomic adds. The trainer's optimiser is ``torch.optim.Adam`` over a dense
parameter, as upstream's (it decays the moments of untouched rows too), so a sparse gradient would need another
optimiser with other semantics. A dense buffer costs one memset of the table's size per step, which a GPU does at
memory bandwidth, and lets every sample add its ``w_c * G`` straight into its rows: no index list, no sort.
Atomics collide mostly on the coarse dense levels, where tcnn's backward collides in the same way.

Corner loops: the 8 corners are unrolled with ``tl.static_range`` and each corner's offsets are the loop index's
constexpr arithmetic, passed straight to the helpers. A name annotated ``tl.constexpr`` inside the loop would be
redefined on the second iteration, which the real compiler rejects (the interpreter lets it pass).

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs, i.e. when this module is imported; the tests
import it with the variable set to run the kernels on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import GridLayout
from .launch import Launch, interpreting

# tcnn's coherent_prime_hash factors (x's is 1); constexpr so kernels may read them, and above 2^31 the y
# factor makes Triton type it uint32, so the products wrap mod 2^32 exactly as tcnn's.
HASH_PRIME_Y = tl.constexpr(2654435761)
HASH_PRIME_Z = tl.constexpr(805459861)


@triton.jit
def _cell(p, scale):
    """Lower cell corner (uint32, as tcnn's ``(uint32_t)(int)floor``) and in-cell position of ``p * s + 0.5``."""
    pos = p * scale + 0.5
    cell = tl.floor(pos)
    return cell.to(tl.int32).to(tl.uint32), pos - cell


@triton.jit
def _corner_row(cx, cy, cz, DX: tl.constexpr, DY: tl.constexpr, DZ: tl.constexpr, res, size, offset, dense):
    """Flat table row (int64) of corner (DX, DY, DZ) of the cells (cx, cy, cz) at one level.

    Dense levels: x + y*res + z*res^2 mod size in uint32 (the +1 corner at the upper border wraps, as in
    tcnn); hashed levels: tcnn's XOR of prime products, masked to the power-of-two size.
    """
    x = cx + DX
    y = cy + DY
    z = cz + DZ
    dense_index = (x + y * res + z * (res * res)) % size
    hashed_index = (x ^ (y * HASH_PRIME_Y) ^ (z * HASH_PRIME_Z)) & (size - 1)
    index = tl.where(dense, dense_index, hashed_index)
    return offset + index.to(tl.int64)


@triton.jit
def _axis_weight(f, D: tl.constexpr):
    """Trilinear weight of the lower (D = 0) or upper (D = 1) corner along one axis."""
    if D == 1:
        return f
    else:
        return 1.0 - f


@triton.jit
def _axis_sign(D: tl.constexpr):
    """d weight / d frac along one axis: -1 for the lower corner, +1 for the upper one."""
    if D == 1:
        return 1.0
    else:
        return -1.0


@triton.jit
def _level(scales, resolutions, sizes, offsets, dense_flags, level):
    scale = tl.load(scales + level)
    res = tl.load(resolutions + level).to(tl.uint32)
    size = tl.load(sizes + level).to(tl.uint32)
    offset = tl.load(offsets + level)
    dense = tl.load(dense_flags + level) != 0
    return scale, res, size, offset, dense


@triton.jit
def _tile(n_points, K: tl.constexpr, F: tl.constexpr, K_PAD: tl.constexpr, F_PAD: tl.constexpr,
          BLOCK_N: tl.constexpr):
    """This program's points and lanes: point mask and int64 index ``[BLOCK_N]``, each lane's grid ``k`` and
    feature ``f``, its table column ``k * F + f``, and the ``[BLOCK_N, K_PAD * F_PAD]`` mask of real values."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < n_points
    lanes = tl.arange(0, K_PAD * F_PAD)
    k = lanes // F_PAD
    f = lanes % F_PAD
    mask = n_mask[:, None] & ((k < K) & (f < F))[None, :]
    return n_mask, n.to(tl.int64), k, f, k * F + f, mask


@triton.jit
def hash_ensemble_fwd(x_ptr, blend_ptr, table_ptr, out_ptr,
                      scales, resolutions, sizes, offsets, dense_flags, n_points,
                      K: tl.constexpr, F: tl.constexpr, L: tl.constexpr, K_PAD: tl.constexpr,
                      F_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[n, l*F + f] = sum_k blend[n, k] * sum_c w_c * table[row_c, k*F + f]``; grid (point blocks, levels).

    Level is the slow grid axis, so programs running at the same time share a level and its (for coarse
    levels, cache-resident) part of the table.
    """
    W: tl.constexpr = K * F
    level = tl.program_id(1)
    n_mask, n64, k, f, column, mask = _tile(n_points, K, F, K_PAD, F_PAD, BLOCK_N)

    scale, res, size, offset, dense = _level(scales, resolutions, sizes, offsets, dense_flags, level)
    cx, fx = _cell(tl.load(x_ptr + n64 * 3 + 0, mask=n_mask, other=0.0), scale)
    cy, fy = _cell(tl.load(x_ptr + n64 * 3 + 1, mask=n_mask, other=0.0), scale)
    cz, fz = _cell(tl.load(x_ptr + n64 * 3 + 2, mask=n_mask, other=0.0), scale)

    acc = tl.zeros((BLOCK_N, K_PAD * F_PAD), dtype=tl.float32)
    for c in tl.static_range(8):
        row = _corner_row(cx, cy, cz, c // 4, (c // 2) % 2, c % 2, res, size, offset, dense)
        w = _axis_weight(fx, c // 4) * _axis_weight(fy, (c // 2) % 2) * _axis_weight(fz, c % 2)
        values = tl.load(table_ptr + row[:, None] * W + column[None, :], mask=mask, other=0.0)
        acc += w[:, None] * values.to(tl.float32)

    blend = tl.load(blend_ptr + n64[:, None] * K + k[None, :], mask=mask, other=0.0)
    blended = tl.sum(tl.reshape(acc * blend, (BLOCK_N, K_PAD, F_PAD)), axis=1)  # [BLOCK_N, F_PAD]
    f_out = tl.arange(0, F_PAD)
    out_offsets = n64[:, None] * (L * F) + level * F + f_out[None, :]
    tl.store(out_ptr + out_offsets, blended.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (f_out < F)[None, :])


@triton.jit
def hash_ensemble_bwd(x_ptr, blend_ptr, table_ptr, grad_out_ptr, grad_x_ptr, grad_blend_ptr, grad_table_ptr,
                      scales, resolutions, sizes, offsets, dense_flags, n_points,
                      K: tl.constexpr, F: tl.constexpr, L: tl.constexpr, K_PAD: tl.constexpr,
                      F_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                      NEED_X: tl.constexpr, NEED_BLEND: tl.constexpr, NEED_TABLE: tl.constexpr):
    """All three gradients in one pass over the levels; grid (point blocks,).

    With ``G[n, k*F + f] = grad_out[n, l*F + f] * blend[n, k]`` (the gradient of the level's interpolated row):
    table rows get ``w_c * G`` by atomic adds into the dense gradient; positions get
    ``s_l * sum_c (d w_c / d frac) * <row_c, G>``; blend weights ``sum_l sum_f grad_out * interpolated``.
    Looping over levels inside the program keeps the position and blend gradients in registers (no atomics
    and no per-level partial buffers for them); the corner rows are gathered again, not saved by the forward.
    """
    W: tl.constexpr = K * F
    NEED_ROWS: tl.constexpr = NEED_X or NEED_BLEND
    n_mask, n64, k, f, column, mask = _tile(n_points, K, F, K_PAD, F_PAD, BLOCK_N)

    px = tl.load(x_ptr + n64 * 3 + 0, mask=n_mask, other=0.0)
    py = tl.load(x_ptr + n64 * 3 + 1, mask=n_mask, other=0.0)
    pz = tl.load(x_ptr + n64 * 3 + 2, mask=n_mask, other=0.0)
    blend = tl.load(blend_ptr + n64[:, None] * K + k[None, :], mask=mask, other=0.0)
    grad_x0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    grad_x1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    grad_x2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    grad_blend = tl.zeros((BLOCK_N, K_PAD * F_PAD), dtype=tl.float32)

    for level in range(L):
        scale, res, size, offset, dense = _level(scales, resolutions, sizes, offsets, dense_flags, level)
        cx, fx = _cell(px, scale)
        cy, fy = _cell(py, scale)
        cz, fz = _cell(pz, scale)
        g = tl.load(grad_out_ptr + n64[:, None] * (L * F) + level * F + f[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        grad_row = g * blend
        interpolated = tl.zeros((BLOCK_N, K_PAD * F_PAD), dtype=tl.float32)
        d_fx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        d_fy = tl.zeros((BLOCK_N,), dtype=tl.float32)
        d_fz = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for c in tl.static_range(8):
            row = _corner_row(cx, cy, cz, c // 4, (c // 2) % 2, c % 2, res, size, offset, dense)
            wx = _axis_weight(fx, c // 4)
            wy = _axis_weight(fy, (c // 2) % 2)
            wz = _axis_weight(fz, c % 2)
            w = wx * wy * wz
            offsets2d = row[:, None] * W + column[None, :]
            if NEED_TABLE:
                tl.atomic_add(grad_table_ptr + offsets2d,
                              (w[:, None] * grad_row).to(grad_table_ptr.dtype.element_ty), mask=mask,
                              sem="relaxed")
            if NEED_ROWS:
                values = tl.load(table_ptr + offsets2d, mask=mask, other=0.0).to(tl.float32)
                if NEED_BLEND:
                    interpolated += w[:, None] * values
                if NEED_X:
                    dot = tl.sum(values * grad_row, axis=1)
                    d_fx += _axis_sign(c // 4) * wy * wz * dot
                    d_fy += _axis_sign((c // 2) % 2) * wx * wz * dot
                    d_fz += _axis_sign(c % 2) * wx * wy * dot
        if NEED_X:
            # d frac / d x = s_l (floor has zero gradient), as in tcnn and the torch backend.
            grad_x0 += scale * d_fx
            grad_x1 += scale * d_fy
            grad_x2 += scale * d_fz
        if NEED_BLEND:
            grad_blend += interpolated * g

    if NEED_X:
        tl.store(grad_x_ptr + n64 * 3 + 0, grad_x0, mask=n_mask)
        tl.store(grad_x_ptr + n64 * 3 + 1, grad_x1, mask=n_mask)
        tl.store(grad_x_ptr + n64 * 3 + 2, grad_x2, mask=n_mask)
    if NEED_BLEND:
        per_grid = tl.sum(tl.reshape(grad_blend, (BLOCK_N, K_PAD, F_PAD)), axis=2)  # [BLOCK_N, K_PAD]
        k_out = tl.arange(0, K_PAD)
        tl.store(grad_blend_ptr + n64[:, None] * K + k_out[None, :], per_grid,
                 mask=n_mask[:, None] & (k_out < K)[None, :])


# --- launching and the autograd op -----------------------------------------------------------------------------

# Points per program: a tile of BLOCK_N x (K_PAD * F_PAD) values. The forward holds a gathered corner tile and
# one accumulator: 2048 lanes (16 per thread at 4 warps) fit in registers at the paper's 64 features. The
# backward holds four tiles at once (blend, the level's gradient row, the interpolated row, the blend
# gradient) besides the gathered one; ptxas spills them on some targets (Ampere and Ada first) until each
# thread holds 4 lanes of a tile, so the backward runs a quarter of the forward's tile. The compile gate
# (benchmarks/gpu_compile.py) records registers and spills per preset and target.
TILE_LANES = 2048
BACKWARD_TILE_LANES = TILE_LANES // 4
MAX_BLOCK_N = 128


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_points(n_grids: int, features: int, tile_lanes: int = TILE_LANES, fewest: int = 16) -> int:
    """Points per program of the forward for a ``K x F`` ensemble (a power of two, at least ``fewest``)."""
    lanes = _next_pow2(n_grids) * _next_pow2(features)
    return max(fewest, min(MAX_BLOCK_N, tile_lanes // lanes))


def backward_block_points(n_grids: int, features: int) -> int:
    """Points per program of the backward (a quarter of the forward's tile, see :data:`BACKWARD_TILE_LANES`)."""
    return block_points(n_grids, features, BACKWARD_TILE_LANES, fewest=8)


def kernels_interpreted() -> bool:
    """The kernels here were built by Triton's interpreter: they take CPU tensors."""
    return interpreting(hash_ensemble_fwd)


class LevelTables:
    """The per-level geometry the kernels read, as small device tensors (float32 / int32 / int64)."""

    def __init__(self, layout: GridLayout, device: torch.device | str) -> None:
        self.scales = torch.tensor(layout.scales, dtype=torch.float32, device=device)
        self.resolutions = torch.tensor(layout.resolutions, dtype=torch.int32, device=device)
        self.sizes = torch.tensor(layout.sizes, dtype=torch.int32, device=device)
        self.offsets = torch.tensor(layout.offsets, dtype=torch.int64, device=device)
        self.dense = torch.tensor(layout.dense, dtype=torch.int32, device=device)

    def args(self) -> tuple[torch.Tensor, ...]:
        return self.scales, self.resolutions, self.sizes, self.offsets, self.dense


def _shape_constexprs(n_grids: int, features: int, n_levels: int, block_n: int) -> dict[str, int]:
    return {"K": n_grids, "F": features, "L": n_levels, "K_PAD": _next_pow2(n_grids),
            "F_PAD": _next_pow2(features), "BLOCK_N": block_n}


def forward_launch(x: torch.Tensor, blend: torch.Tensor, table: torch.Tensor, levels: LevelTables, n_grids: int,
                   features: int, block_n: int) -> tuple[Launch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward launch over ``x[N, 3]``, ``blend[N, K]``, ``table[E, K*F]`` and its output ``[N, L*F]``,
    with the float32 inputs it reads (saved for the backward)."""
    x32 = x.detach().float().contiguous()
    blend32 = blend.detach().float().contiguous()
    n, n_levels = x32.shape[0], levels.scales.shape[0]
    out = torch.empty(n, n_levels * features, dtype=table.dtype, device=x.device)
    launch = Launch(hash_ensemble_fwd, (-(-n // block_n), n_levels),
                    (x32, blend32, table.detach(), out, *levels.args(), n),
                    _shape_constexprs(n_grids, features, n_levels, block_n))
    return launch, out, x32, blend32


def backward_launch(x32: torch.Tensor, blend32: torch.Tensor, table: torch.Tensor, grad_out: torch.Tensor,
                    levels: LevelTables, n_grids: int, features: int, block_n: int,
                    needs: tuple[bool, bool, bool]) -> tuple[Launch, tuple[torch.Tensor | None, ...]]:
    """The backward launch and the gradients it fills: ``(x, blend, table)``, None where ``needs`` is False."""
    need_x, need_blend, need_table = needs
    n, n_levels, device = x32.shape[0], levels.scales.shape[0], x32.device
    grad_x = torch.zeros(n, 3, dtype=torch.float32, device=device) if need_x else None
    grad_blend = torch.zeros(n, n_grids, dtype=torch.float32, device=device) if need_blend else None
    grad_table = torch.zeros_like(table) if need_table else None
    unused = x32  # never written: the kernel's constexpr flags skip the outputs not asked for
    launch = Launch(hash_ensemble_bwd, (-(-n // block_n),),
                    (x32, blend32, table.detach(), grad_out.contiguous(),
                     unused if grad_x is None else grad_x, unused if grad_blend is None else grad_blend,
                     unused if grad_table is None else grad_table, *levels.args(), n),
                    {**_shape_constexprs(n_grids, features, n_levels, block_n),
                     "NEED_X": need_x, "NEED_BLEND": need_blend, "NEED_TABLE": need_table})
    return launch, (grad_x, grad_blend, grad_table)


class _HashEnsembleFunction(torch.autograd.Function):
    """``(x[N, 3], blend[N, K], table[E, K*F]) -> [N, L*F]`` through the Triton kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blend: torch.Tensor, table: torch.Tensor, levels: LevelTables,
                n_grids: int, features: int, block_n: int) -> torch.Tensor:
        launch, out, x32, blend32 = forward_launch(x, blend, table, levels, n_grids, features, block_n)
        if x32.shape[0]:
            launch.run()
        ctx.save_for_backward(x32, blend32, table)
        ctx.levels, ctx.n_grids, ctx.features = levels, n_grids, features
        ctx.x_dtype, ctx.blend_dtype = x.dtype, blend.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x32, blend32, table = ctx.saved_tensors
        needs = tuple(bool(b) for b in ctx.needs_input_grad[:3])
        block_n = backward_block_points(ctx.n_grids, ctx.features)
        launch, (grad_x, grad_blend, grad_table) = backward_launch(
            x32, blend32, table, grad_out, ctx.levels, ctx.n_grids, ctx.features, block_n, needs)
        if x32.shape[0] and any(needs):
            launch.run()
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_blend is not None:
            grad_blend = grad_blend.to(ctx.blend_dtype)
        return grad_x, grad_blend, grad_table, None, None, None, None


def hash_ensemble(x: torch.Tensor, blend: torch.Tensor, table: torch.Tensor, levels: LevelTables,
                  n_grids: int, features: int, block_n: int | None = None) -> torch.Tensor:
    """The blended encoding ``[N, L*F]`` of ``x[N, 3]`` in [0, 1] with per-grid weights ``blend[N, K]``;
    ``block_n`` sets the forward's points per program (the backward takes :func:`backward_block_points`)."""
    block_n = block_n or block_points(n_grids, features)
    return _HashEnsembleFunction.apply(x, blend, table, levels, n_grids, features, block_n)
