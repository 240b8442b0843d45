"""Fused Triton kernels for packed samples: volume-rendering compositing and occupancy-grid ray marching.

Twins (STYLE.md section 6): :func:`composite_packed` computes what ``rendering.accumulate_along_rays`` computes
(``render_weights`` and the per-ray sums); :func:`march_occupied` what the torch expansion and occupancy test in
``sampling.march_rays`` compute (and the CPU's :func:`..cpu.ops.march_occupied`, same signature).

Why fused: on a GPU the torch twins are a chain of small ops over ``S`` samples (float64 cumsum, bincount,
gathers, ``index_add``), each writing its ``[S]`` intermediate to memory, and the marcher materialises every
lattice sample of every ray before the occupancy test throws most away. Here, as in nerfacc's CUDA kernels,
one lane owns one ray and walks its segment front to back, keeping transmittance and the sums in registers;
the marcher counts occupied samples in one pass and writes them in a second, so only kept samples are
stored. Lanes of a program walk rays of different lengths, up to the longest in the block (masked).

Kernels compute in the dtype of their inputs (float32 in training; float64 lets the tests run
``torch.autograd.gradcheck`` on them under ``TRITON_INTERPRET=1``). They run on CUDA tensors, and on CPU
tensors only under Triton's interpreter; the model reaches them only with the ``triton`` encoding. Each launch
is built by a ``*_launch`` function (:class:`.launch.Launch`), which the compile gate compiles as it is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launch, interpreting

RAYS_PER_PROGRAM = 64


# --- compositing -----------------------------------------------------------------------------------------------


@triton.jit
def composite_fwd(sigmas, t_starts, t_ends, rgbs, starts, counts,
                  weights, transmittance, accumulation, rgb_sum, depth_sum, n_rays, BLOCK: tl.constexpr):
    """Per ray, front to back: ``T_i = exp(-sum_{j<i} tau_j)``, ``w_i = T_i (1 - exp(-tau_i))``, ``tau = sigma dt``;
    stores ``w`` and ``T`` per sample and ``sum w``, ``sum w c``, ``sum w t_mid`` per ray."""
    ray = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ray_mask = ray < n_rays
    start = tl.load(starts + ray, mask=ray_mask, other=0)
    count = tl.load(counts + ray, mask=ray_mask, other=0)
    zero = tl.zeros((BLOCK,), dtype=weights.dtype.element_ty)
    optical_depth, acc, red, green, blue, depth = zero, zero, zero, zero, zero, zero
    for i in range(0, tl.max(count, axis=0)):
        live = ray_mask & (i < count)
        s = start + i
        t0 = tl.load(t_starts + s, mask=live, other=0.0)
        t1 = tl.load(t_ends + s, mask=live, other=0.0)
        tau = tl.load(sigmas + s, mask=live, other=0.0) * (t1 - t0)
        trans = tl.exp(-optical_depth)
        w = trans * (1.0 - tl.exp(-tau))
        tl.store(weights + s, w, mask=live)
        tl.store(transmittance + s, trans, mask=live)
        acc += w
        red += w * tl.load(rgbs + s * 3 + 0, mask=live, other=0.0)
        green += w * tl.load(rgbs + s * 3 + 1, mask=live, other=0.0)
        blue += w * tl.load(rgbs + s * 3 + 2, mask=live, other=0.0)
        depth += w * 0.5 * (t0 + t1)
        optical_depth += tau
    tl.store(accumulation + ray, acc, mask=ray_mask)
    tl.store(rgb_sum + ray * 3 + 0, red, mask=ray_mask)
    tl.store(rgb_sum + ray * 3 + 1, green, mask=ray_mask)
    tl.store(rgb_sum + ray * 3 + 2, blue, mask=ray_mask)
    tl.store(depth_sum + ray, depth, mask=ray_mask)


@triton.jit
def composite_bwd(sigmas, t_starts, t_ends, rgbs, starts, counts, weights, transmittance,
                  grad_weights, grad_accumulation, grad_rgb_sum, grad_depth_sum,
                  grad_sigmas, grad_rgbs, n_rays, BLOCK: tl.constexpr):
    """Per ray, back to front. With ``g_i`` the total gradient reaching ``w_i`` (from ``w`` itself and the three
    sums), ``d w_i / d tau_k`` is ``T_{k+1}`` for ``i = k``, ``-w_i`` for ``i > k`` and 0 before, so
    ``dL/dtau_k = g_k T_{k+1} - sum_{i>k} g_i w_i``: the suffix sum is carried from the back, exactly (no
    total-minus-prefix cancellation). Colours get ``w_i * grad_rgb_sum``."""
    ray = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ray_mask = ray < n_rays
    start = tl.load(starts + ray, mask=ray_mask, other=0)
    count = tl.load(counts + ray, mask=ray_mask, other=0)
    g_acc = tl.load(grad_accumulation + ray, mask=ray_mask, other=0.0)
    g_red = tl.load(grad_rgb_sum + ray * 3 + 0, mask=ray_mask, other=0.0)
    g_green = tl.load(grad_rgb_sum + ray * 3 + 1, mask=ray_mask, other=0.0)
    g_blue = tl.load(grad_rgb_sum + ray * 3 + 2, mask=ray_mask, other=0.0)
    g_depth = tl.load(grad_depth_sum + ray, mask=ray_mask, other=0.0)
    suffix = tl.zeros((BLOCK,), dtype=grad_sigmas.dtype.element_ty)
    for i in range(0, tl.max(count, axis=0)):
        live = ray_mask & (i < count)
        s = start + count - 1 - i
        t0 = tl.load(t_starts + s, mask=live, other=0.0)
        t1 = tl.load(t_ends + s, mask=live, other=0.0)
        dt = t1 - t0
        tau = tl.load(sigmas + s, mask=live, other=0.0) * dt
        w = tl.load(weights + s, mask=live, other=0.0)
        trans_next = tl.load(transmittance + s, mask=live, other=0.0) * tl.exp(-tau)
        red = tl.load(rgbs + s * 3 + 0, mask=live, other=0.0)
        green = tl.load(rgbs + s * 3 + 1, mask=live, other=0.0)
        blue = tl.load(rgbs + s * 3 + 2, mask=live, other=0.0)
        g = (tl.load(grad_weights + s, mask=live, other=0.0) + g_acc + g_red * red + g_green * green
             + g_blue * blue + g_depth * 0.5 * (t0 + t1))
        tl.store(grad_sigmas + s, (g * trans_next - suffix) * dt, mask=live)
        tl.store(grad_rgbs + s * 3 + 0, w * g_red, mask=live)
        tl.store(grad_rgbs + s * 3 + 1, w * g_green, mask=live)
        tl.store(grad_rgbs + s * 3 + 2, w * g_blue, mask=live)
        suffix += g * w


def ray_segments(ray_indices: torch.Tensor, n_rays: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First sample and sample count of each ray (nerfacc's ``packed_info``), samples grouped by ray."""
    counts = torch.bincount(ray_indices, minlength=n_rays)
    return torch.cumsum(counts, 0) - counts, counts


def _programs(n_rays: int) -> tuple[int]:
    return (triton.cdiv(n_rays, RAYS_PER_PROGRAM),)


def composite_forward_launch(sigmas: torch.Tensor, rgbs: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                             starts: torch.Tensor, counts: torch.Tensor
                             ) -> tuple[Launch, tuple[torch.Tensor, ...]]:
    """The forward launch and its outputs: weights, transmittance ``[S]``, accumulation, rgb and depth sums."""
    n_rays, dtype, device = counts.shape[0], sigmas.dtype, sigmas.device
    weights = torch.empty_like(sigmas)
    transmittance = torch.empty_like(sigmas)
    accumulation = torch.zeros(n_rays, dtype=dtype, device=device)
    rgb_sum = torch.zeros(n_rays, 3, dtype=dtype, device=device)
    depth_sum = torch.zeros(n_rays, dtype=dtype, device=device)
    launch = Launch(composite_fwd, _programs(n_rays),
                    (sigmas, t_starts, t_ends, rgbs, starts, counts, weights, transmittance, accumulation, rgb_sum,
                     depth_sum, n_rays), {"BLOCK": RAYS_PER_PROGRAM})
    return launch, (weights, transmittance, accumulation, rgb_sum, depth_sum)


def composite_backward_launch(saved: tuple[torch.Tensor, ...], grad_weights: torch.Tensor,
                              grad_accumulation: torch.Tensor, grad_rgb_sum: torch.Tensor,
                              grad_depth_sum: torch.Tensor) -> tuple[Launch, torch.Tensor, torch.Tensor]:
    """The backward launch from the forward's saved tensors, and the gradients it fills (sigmas, rgbs)."""
    sigmas, rgbs, t_starts, t_ends, starts, counts, weights, transmittance = saved
    grad_sigmas = torch.zeros_like(sigmas)
    grad_rgbs = torch.zeros_like(rgbs)
    n_rays = counts.shape[0]
    launch = Launch(composite_bwd, _programs(n_rays),
                    (sigmas, t_starts, t_ends, rgbs, starts, counts, weights, transmittance,
                     grad_weights.contiguous(), grad_accumulation.contiguous(), grad_rgb_sum.contiguous(),
                     grad_depth_sum.contiguous(), grad_sigmas, grad_rgbs, n_rays), {"BLOCK": RAYS_PER_PROGRAM})
    return launch, grad_sigmas, grad_rgbs


class _CompositeFunction(torch.autograd.Function):
    """``(sigmas[S], rgbs[S, 3]) -> weights[S], accumulation[N], rgb_sum[N, 3], depth_sum[N]``; the interval
    bounds are constants (the marcher's samples carry no gradient)."""

    @staticmethod
    def forward(ctx, sigmas, rgbs, t_starts, t_ends, starts, counts):
        launch, (weights, transmittance, accumulation, rgb_sum, depth_sum) = composite_forward_launch(
            sigmas, rgbs, t_starts, t_ends, starts, counts)
        if sigmas.numel() and counts.shape[0]:
            launch.run()
        ctx.save_for_backward(sigmas, rgbs, t_starts, t_ends, starts, counts, weights, transmittance)
        return weights, accumulation, rgb_sum, depth_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weights, grad_accumulation, grad_rgb_sum, grad_depth_sum):
        saved = ctx.saved_tensors
        launch, grad_sigmas, grad_rgbs = composite_backward_launch(saved, grad_weights, grad_accumulation,
                                                                   grad_rgb_sum, grad_depth_sum)
        if saved[0].numel() and saved[5].shape[0]:
            launch.run()
        return grad_sigmas, grad_rgbs, None, None, None, None


def composite_packed(sigmas: torch.Tensor, rgbs: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                     ray_indices: torch.Tensor, n_rays: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights ``[S]``, accumulated opacity ``[N]``, weighted colour sum ``[N, 3]`` and weighted ``t_mid`` sum ``[N]``.

    The fused twin of :func:`stages.nersemble.rendering.accumulate_along_rays`; gradients reach ``sigmas`` and
    ``rgbs``. Samples must be grouped by ray and sorted by distance within a ray (the marcher's order).
    """
    dtype = torch.promote_types(sigmas.dtype, rgbs.dtype)
    starts, counts = ray_segments(ray_indices, n_rays)
    as_dtype = [t.to(dtype).contiguous() for t in (sigmas, rgbs, t_starts, t_ends)]
    return _CompositeFunction.apply(*as_dtype, starts, counts)


# --- occupancy-grid marching -----------------------------------------------------------------------------------


@triton.jit
def _cell_index(p, lo, hi, R: tl.constexpr):
    """Grid cell along one axis: ``clamp(int((p - lo) / (hi - lo) * R), 0, R - 1)`` (truncation, as ``.long()``)."""
    cell = (((p - lo) / (hi - lo)) * R).to(tl.int64)
    return tl.minimum(tl.maximum(cell, 0), R - 1)


@triton.jit
def march_kernel(rays_o, rays_d, t0s, k_firsts, counts, step, box, occupied, kept_counts, out_starts,
                 ray_indices, t_starts, n_rays, R: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr):
    """Walk each ray's lattice ``t0 + (k + [0, 1]) dt``, ``k = k_first .. k_first + count - 1``, and test the
    midpoint's cell in ``occupied`` (``[R, R, R]`` uint8, ``(i * R + j) * R + k``) with the torch marcher's
    arithmetic (truncation, clamp to the grid). ``WRITE`` False: store the kept count per ray; True: store the
    kept samples' ray index and ``t_start`` from the ray's ``out_starts`` offset on. ``step`` is a one-element
    tensor and ``box`` the ``[2, 3]`` box, both in the rays' dtype, so the arithmetic is the torch marcher's
    in float64 too."""
    ray = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ray_mask = ray < n_rays
    ox = tl.load(rays_o + ray * 3 + 0, mask=ray_mask, other=0.0)
    oy = tl.load(rays_o + ray * 3 + 1, mask=ray_mask, other=0.0)
    oz = tl.load(rays_o + ray * 3 + 2, mask=ray_mask, other=0.0)
    dx = tl.load(rays_d + ray * 3 + 0, mask=ray_mask, other=0.0)
    dy = tl.load(rays_d + ray * 3 + 1, mask=ray_mask, other=0.0)
    dz = tl.load(rays_d + ray * 3 + 2, mask=ray_mask, other=0.0)
    t0 = tl.load(t0s + ray, mask=ray_mask, other=0.0)
    k_first = tl.load(k_firsts + ray, mask=ray_mask, other=0)
    count = tl.load(counts + ray, mask=ray_mask, other=0)
    step_size = tl.load(step)
    lo_x, lo_y, lo_z = tl.load(box + 0), tl.load(box + 1), tl.load(box + 2)
    hi_x, hi_y, hi_z = tl.load(box + 3), tl.load(box + 4), tl.load(box + 5)
    if WRITE:
        out = tl.load(out_starts + ray, mask=ray_mask, other=0)
    kept = tl.zeros((BLOCK,), dtype=tl.int64)
    for i in range(0, tl.max(count, axis=0)):
        live = ray_mask & (i < count)
        t_start = t0 + (k_first + i).to(t0.dtype) * step_size
        t_mid = 0.5 * (t_start + (t_start + step_size))
        ix = _cell_index(ox + dx * t_mid, lo_x, hi_x, R)
        iy = _cell_index(oy + dy * t_mid, lo_y, hi_y, R)
        iz = _cell_index(oz + dz * t_mid, lo_z, hi_z, R)
        keep = live & (tl.load(occupied + (ix * R + iy) * R + iz, mask=live, other=0) != 0)
        if WRITE:
            tl.store(ray_indices + out + kept, ray.to(tl.int64), mask=keep)
            tl.store(t_starts + out + kept, t_start, mask=keep)
        kept += keep.to(tl.int64)
    if not WRITE:
        tl.store(kept_counts + ray, kept, mask=ray_mask)


def march_launch(rays_o: torch.Tensor, rays_d: torch.Tensor, t0: torch.Tensor, k_first: torch.Tensor,
                 counts: torch.Tensor, step: torch.Tensor, box: torch.Tensor, grid: torch.Tensor, kept: torch.Tensor,
                 out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> Launch:
    """The counting launch (``out`` None: kept samples per ray into ``kept``) or the writing one (``out``: the
    rays' output offsets, ray indices and ``t_starts``)."""
    n_rays = rays_o.shape[0]
    empty_long = torch.empty(0, dtype=torch.int64, device=rays_o.device)
    empty = torch.empty(0, dtype=rays_o.dtype, device=rays_o.device)
    out_starts, ray_indices, t_starts = out if out is not None else (empty_long, empty_long, empty)
    return Launch(march_kernel, _programs(n_rays),
                  (rays_o, rays_d, t0, k_first, counts, step, box, grid, kept, out_starts, ray_indices, t_starts,
                   n_rays), {"R": grid.shape[0], "WRITE": out is not None, "BLOCK": RAYS_PER_PROGRAM})


def march_inputs(rays_o: torch.Tensor, rays_d: torch.Tensor, t0: torch.Tensor, k_first: torch.Tensor,
                 counts: torch.Tensor, step_size: float, aabb: torch.Tensor, occupied: torch.Tensor
                 ) -> tuple[torch.Tensor, ...]:
    """:func:`march_launch`'s first eight arguments, in the types and layout the kernel reads."""
    r = occupied.shape[0]
    if occupied.shape != (r, r, r):
        raise ValueError(f"occupied must be a cubic [R, R, R] grid, got {tuple(occupied.shape)}")
    device, dtype = rays_o.device, rays_o.dtype
    rays_o, rays_d, t0 = (t.contiguous() for t in (rays_o, rays_d, t0.to(dtype)))
    step = torch.tensor([step_size], dtype=dtype, device=device)
    return (rays_o, rays_d, t0, k_first.long().contiguous(), counts.long().contiguous(), step,
            aabb.to(device=device, dtype=dtype).contiguous(), occupied.contiguous().to(torch.uint8))


def march_occupied(rays_o: torch.Tensor, rays_d: torch.Tensor, t0: torch.Tensor, k_first: torch.Tensor,
                   counts: torch.Tensor, step_size: float, aabb: torch.Tensor, occupied: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ray_indices, t_starts, t_ends)`` of the lattice samples whose midpoint lies in an occupied cell.

    The arguments are ``sampling.march_rays``'s per-ray lattice (``t0``, first step ``k_first`` and step
    ``counts``); two passes (count, then write at the prefix-sum offsets), so nothing but the kept samples is
    stored. Grid cubic, ``[R, R, R]``.
    """
    inputs = march_inputs(rays_o, rays_d, t0, k_first, counts, step_size, aabb, occupied)
    n_rays, device, dtype = rays_o.shape[0], rays_o.device, rays_o.dtype
    kept = torch.zeros(n_rays, dtype=torch.int64, device=device)
    if n_rays == 0:
        empty = torch.empty(0, dtype=dtype, device=device)
        return torch.empty(0, dtype=torch.int64, device=device), empty, empty
    march_launch(*inputs, kept).run()
    out_starts = torch.cumsum(kept, 0) - kept
    total = int(kept.sum())  # one device-to-host sync, as in nerfacc: the output size
    ray_indices = torch.empty(total, dtype=torch.int64, device=device)
    t_starts = torch.empty(total, dtype=dtype, device=device)
    if total:
        march_launch(*inputs, kept, (out_starts, ray_indices, t_starts)).run()
    return ray_indices, t_starts, t_starts + step_size


def kernels_interpreted() -> bool:
    """These kernels were built by Triton's interpreter (``TRITON_INTERPRET=1`` at import): they take CPU tensors."""
    return interpreting(composite_fwd)


def uses_kernels(tensor: torch.Tensor) -> bool:
    """Kernels run on CUDA tensors, and on CPU tensors only under Triton's interpreter."""
    return tensor.is_cuda or kernels_interpreted()
