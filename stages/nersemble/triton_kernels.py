"""Triton kernels of the hash-ensemble encoding (forward and backward); the autograd wrapper is triton_encoding.

Layout is the torch backend's: one ``table[E, W]`` (W = K grids x F features, row-major), tcnn's per-level
offsets, sizes, dense-or-hashed indexing and uint32 arithmetic (:mod:`stages.nersemble.hash_encoding`).
A program owns ``BLOCK_N`` points; its tile is ``[BLOCK_N, K_PAD * F_PAD]`` with lane ``j`` holding grid
``j // F_PAD`` and feature ``j % F_PAD`` (padding lanes masked), so the blend is an elementwise product and
the sum over grids one reshape-and-reduce, for any K and F.

Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs, i.e. when this module is imported; the tests
reload it with the variable set to run the kernels on CPU tensors. Callers reach the kernels through the
module (``triton_kernels.hash_ensemble_fwd``), never by name, so a reload takes effect everywhere.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < n_points
    n64 = n.to(tl.int64)
    lanes = tl.arange(0, K_PAD * F_PAD)
    k = lanes // F_PAD
    f = lanes % F_PAD
    lane_mask = (k < K) & (f < F)
    column = k * F + f
    mask = n_mask[:, None] & lane_mask[None, :]

    scale, res, size, offset, dense = _level(scales, resolutions, sizes, offsets, dense_flags, level)
    cx, fx = _cell(tl.load(x_ptr + n64 * 3 + 0, mask=n_mask, other=0.0), scale)
    cy, fy = _cell(tl.load(x_ptr + n64 * 3 + 1, mask=n_mask, other=0.0), scale)
    cz, fz = _cell(tl.load(x_ptr + n64 * 3 + 2, mask=n_mask, other=0.0), scale)

    acc = tl.zeros((BLOCK_N, K_PAD * F_PAD), dtype=tl.float32)
    for c in tl.static_range(8):
        DX: tl.constexpr = c // 4
        DY: tl.constexpr = (c // 2) % 2
        DZ: tl.constexpr = c % 2
        row = _corner_row(cx, cy, cz, DX, DY, DZ, res, size, offset, dense)
        w = _axis_weight(fx, DX) * _axis_weight(fy, DY) * _axis_weight(fz, DZ)
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
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < n_points
    n64 = n.to(tl.int64)
    lanes = tl.arange(0, K_PAD * F_PAD)
    k = lanes // F_PAD
    f = lanes % F_PAD
    lane_mask = (k < K) & (f < F)
    column = k * F + f
    mask = n_mask[:, None] & lane_mask[None, :]

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
            DX: tl.constexpr = c // 4
            DY: tl.constexpr = (c // 2) % 2
            DZ: tl.constexpr = c % 2
            row = _corner_row(cx, cy, cz, DX, DY, DZ, res, size, offset, dense)
            wx = _axis_weight(fx, DX)
            wy = _axis_weight(fy, DY)
            wz = _axis_weight(fz, DZ)
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
                    d_fx += _axis_sign(DX) * wy * wz * dot
                    d_fy += _axis_sign(DY) * wx * wz * dot
                    d_fz += _axis_sign(DZ) * wx * wy * dot
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
