"""The CPU fast path's kernels as tensor ops (float32 CPU tensors; callers check :func:`applies` first).

Each op names its torch twin, the code the tests hold it against:

| op | twin |
| --- | --- |
| :func:`hash_ensemble` (autograd) | ``TorchHashEnsemble.reference_forward`` (``stages/nersemble/hash_encoding.py``) |
| :func:`se3_warp` (autograd) | ``se3_exp`` and the transform in ``SE3DeformationField.forward`` |
| :func:`posenc` | ``windowed_posenc`` of box-normalised positions (``stages/nersemble/deformation.py``) |
| :func:`warp_encode` | ``deform_positions`` + box normalisation + the encoding (``NeRSembleField.density`` up to its MLP) |
| :func:`march_occupied` | the expansion and occupancy test of ``sampling.march_rays`` |
| :class:`FrontToBack` | the slab bookkeeping of ``NeRSembleModel._visible`` |

Ops take tensors and plain numbers, never model objects, so nothing here imports the model.
"""

from __future__ import annotations

import torch

from ..layout import GridLayout
from .build import MAX_LEVELS, MAX_WIDTH, applies, library

__all__ = ["FrontToBack", "Geometry", "applies", "box_params", "fits", "hash_ensemble", "march_occupied", "posenc",
           "se3_warp", "warp_encode"]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def fits(n_levels: int, width: int) -> bool:
    """An ensemble of ``n_levels`` levels and ``width`` = K*F columns fits the kernels' stack buffers."""
    return width <= MAX_WIDTH and n_levels <= MAX_LEVELS


class Geometry:
    """The level geometry of a hash ensemble (tcnn's :class:`GridLayout`) as contiguous CPU buffers."""

    def __init__(self, layout: GridLayout, n_grids: int, features: int) -> None:
        self.n_levels, self.n_grids, self.feats = len(layout.scales), n_grids, features
        self.n_dense = layout.n_dense
        self.scales = torch.tensor(layout.scales, dtype=torch.float32)
        self.res = torch.tensor(layout.resolutions, dtype=torch.int64)
        self.sizes = torch.tensor(layout.sizes, dtype=torch.int64)
        self.offsets = torch.tensor(layout.offsets, dtype=torch.int64)

    def args(self) -> tuple:
        return (self.n_levels, self.n_grids, self.feats, _ptr(self.scales), _ptr(self.res), _ptr(self.sizes),
                _ptr(self.offsets), self.n_dense)


class _FusedHash(torch.autograd.Function):
    """Fused hash-ensemble encoding: ``(x [N, 3], blend [N, K], table [E, K*F]) -> [N, L*F]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blend: torch.Tensor, table: torch.Tensor, geometry: Geometry):
        x, blend = x.contiguous(), blend.contiguous()
        t = table.detach()
        out = torch.empty(x.shape[0], geometry.n_levels * geometry.feats)
        library().hash_forward(_ptr(x), _ptr(blend), _ptr(t), x.shape[0], *geometry.args(), _ptr(out),
                               torch.get_num_threads())
        ctx.save_for_backward(x, blend, table)
        ctx.geometry = geometry
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, blend, table = ctx.saved_tensors
        geometry = ctx.geometry
        need_x, need_blend, need_table = ctx.needs_input_grad[:3]
        grad_out = grad_out.float().contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_blend = torch.empty_like(blend) if need_blend else None
        grad_table = torch.zeros_like(table) if need_table else None
        library().hash_backward(_ptr(x), _ptr(blend), _ptr(table.detach()), _ptr(grad_out), x.shape[0],
                                *geometry.args(), _ptr(grad_x), _ptr(grad_blend), _ptr(grad_table),
                                torch.get_num_threads())
        return grad_x, grad_blend, grad_table, None


def hash_ensemble(x: torch.Tensor, blend: torch.Tensor, table: torch.Tensor, geometry: Geometry) -> torch.Tensor:
    """The blended encoding ``[N, L*F]`` of ``x[N, 3]`` in [0, 1] with per-grid weights ``blend[N, K]``, with
    gradients to all three."""
    return _FusedHash.apply(x, blend, table, geometry)


class _SE3Warp(torch.autograd.Function):
    """The deformation's warp ``(x_n, v, r) -> R x_n + V v`` (NaN guarded) as one C pass each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, r: torch.Tensor, eps: float):
        x, v, r = x.contiguous(), v.contiguous(), r.contiguous()
        out = torch.empty_like(x)
        library().se3_warp(_ptr(x), _ptr(v), _ptr(r), x.shape[0], eps, _ptr(out), torch.get_num_threads())
        ctx.save_for_backward(x, v, r)
        ctx.eps = eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, v, r = ctx.saved_tensors
        grad_out = grad_out.float().contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_v, grad_r = torch.empty_like(v), torch.empty_like(r)
        library().se3_warp_backward(_ptr(x), _ptr(v), _ptr(r), _ptr(grad_out), x.shape[0], ctx.eps, _ptr(grad_x),
                                    _ptr(grad_v), _ptr(grad_r), torch.get_num_threads())
        return grad_x, grad_v, grad_r, None


def se3_warp(x: torch.Tensor, v: torch.Tensor, r: torch.Tensor, eps: float) -> torch.Tensor:
    """``SE3DeformationField.forward``'s warp of box-normalised ``x`` by the
    screw axes ``(v, r)``, ``[N, 3]`` each, with gradients; callers check :func:`applies` first.

    Its torch twin (``se3_exp``, the transform, the NaN guard) is some forty small ops forward and as many
    autograd nodes back, over the few thousand samples of a training step: per-op overhead, not arithmetic.
    """
    return _SE3Warp.apply(x, v, r, float(eps))


def box_params(scene_box: torch.Tensor, eps: float) -> torch.Tensor:
    """``warp_encode``'s fparams: box min[3], box max[3], the exp map's eps."""
    return torch.cat([scene_box.detach().float().cpu().view(-1), torch.tensor([eps], dtype=torch.float32)])


def warp_encode(table: torch.Tensor, geometry: Geometry, positions: torch.Tensor, screw: torch.Tensor | None,
                blend: torch.Tensor, fparams: torch.Tensor, box_units: bool, want_offset: bool = True,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hash features ``[N, L*F]``, inside mask ``[N]`` (1.0/0.0) and offset ``[N, 3]`` of world ``positions``.

    ``screw`` ``[N, 6]`` is the deformation MLP's ``cat(v, r)`` (None: no deformation); the kernel applies the
    SE(3) warp (``deform_positions``), normalises to the box and encodes with ``table`` (``NeRSembleField.density``
    up to the density MLP): the twins of what it computes. ``fparams``: :func:`box_params`.
    """
    n = positions.shape[0]
    positions, blend = positions.detach().float().contiguous(), blend.detach().float().contiguous()
    screw = None if screw is None else screw.detach().float().contiguous()
    features = torch.empty(n, geometry.n_levels * geometry.feats)
    inside = torch.empty(n)
    offset = torch.empty(n, 3) if want_offset else None
    library().warp_encode(_ptr(positions), _ptr(screw), _ptr(blend), n, _ptr(fparams), int(box_units),
                          _ptr(table.detach()), *geometry.args(), _ptr(features), _ptr(inside),
                          _ptr(offset), torch.get_num_threads())
    return features, inside, offset


def posenc(positions: torch.Tensor, box: torch.Tensor, n_frequencies: int, window: torch.Tensor,
           include_input: bool) -> torch.Tensor:
    """``windowed_posenc`` of world ``positions`` normalised to ``box`` (``[6]``: min, max), per-band ``window``."""
    positions = positions.detach().float().contiguous()
    window = window.float().contiguous()
    width = 6 * n_frequencies + (3 if include_input else 0)
    out = torch.empty(positions.shape[0], width)
    library().posenc(_ptr(positions), positions.shape[0], _ptr(box), n_frequencies, _ptr(window),
                     int(include_input), _ptr(out), torch.get_num_threads())
    return out


class FrontToBack:
    """Early ray termination over packed samples: pick each alive ray's next samples, then update from their
    densities which samples are kept and which rays go on (``NeRSembleModel._visible`` is the twin).

    Samples are grouped by ray (``ray_indices`` sorted); the state (per-ray next sample, float64 optical depth,
    alive flag; per-sample keep flag and the kept samples' values) lives in buffers the kernels update in place.
    """

    def __init__(self, ray_indices: torch.Tensor, t_starts: torch.Tensor, t_ends: torch.Tensor,
                 rays_o: torch.Tensor, rays_d: torch.Tensor, timesteps: torch.Tensor, full_query: bool) -> None:
        n_rays, n = rays_o.shape[0], ray_indices.shape[0]
        self.counts = torch.bincount(ray_indices, minlength=n_rays)
        self.first = torch.cumsum(self.counts, 0) - self.counts
        self.next = torch.zeros(n_rays, dtype=torch.int64)
        self.alive = torch.ones(n_rays, dtype=torch.uint8)
        self.optical_depth = torch.zeros(n_rays, dtype=torch.float64)
        self.keep = torch.zeros(n, dtype=torch.uint8)
        self.t_starts, self.t_ends = t_starts.float().contiguous(), t_ends.float().contiguous()
        self.o, self.d = rays_o.float().contiguous(), rays_d.float().contiguous()
        self.timesteps = timesteps.long().contiguous()
        self.sigma = torch.zeros(n) if full_query else None
        self.rgb = torch.zeros(n, 3) if full_query else None
        self.offset = torch.zeros(n, 3) if full_query else None
        self.ids = torch.empty(n, dtype=torch.int64)
        self.ray_ids = torch.empty(n, dtype=torch.int64)
        self.positions, self.directions = torch.empty(n, 3), torch.empty(n, 3)
        self.sample_timesteps = torch.empty(n, dtype=torch.int64)

    def take(self, slab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next ``slab`` samples of every alive ray: sample ids, ray ids, midpoint positions ``[M, 3]``,
        their rays' directions ``[M, 3]`` and timesteps ``[M]``."""
        m = library().slab_take(self.counts.shape[0], _ptr(self.first), _ptr(self.counts), _ptr(self.next),
                                _ptr(self.alive), slab, _ptr(self.o), _ptr(self.d), _ptr(self.timesteps),
                                _ptr(self.t_starts), _ptr(self.t_ends), _ptr(self.ids), _ptr(self.ray_ids),
                                _ptr(self.positions), _ptr(self.directions), _ptr(self.sample_timesteps))
        return self.ids[:m], self.ray_ids[:m], self.positions[:m], self.directions[:m], self.sample_timesteps[:m]

    def update(self, ids: torch.Tensor, ray_ids: torch.Tensor, sigma: torch.Tensor, rgb: torch.Tensor | None,
               offset: torch.Tensor | None, alpha_threshold: float, eps: float) -> None:
        sigma = sigma.float().contiguous()
        rgb = None if rgb is None else rgb.float().contiguous()
        offset = None if offset is None else offset.float().contiguous()
        library().slab_update(ids.shape[0], _ptr(ids), _ptr(ray_ids), _ptr(sigma), _ptr(rgb), _ptr(offset),
                              _ptr(self.t_starts), _ptr(self.t_ends), float(alpha_threshold), float(eps),
                              _ptr(self.optical_depth), _ptr(self.alive), _ptr(self.keep), _ptr(self.sigma),
                              _ptr(self.rgb), _ptr(self.offset))


def march_occupied(rays_o: torch.Tensor, rays_d: torch.Tensor, t0: torch.Tensor, k_first: torch.Tensor,
                   counts: torch.Tensor, step_size: float, aabb: torch.Tensor, occupied: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The occupied samples of each ray's lattice ``t0 + (k_first + j) dt``, ``j < counts``, packed by ray.

    ``sampling.march_rays``'s expansion and occupancy test without materialising the
    unoccupied samples; returns ``(ray_indices, t_starts, t_ends)``.
    """
    lib = library()
    o, d = rays_o.float().contiguous(), rays_d.float().contiguous()
    t0, k_first, counts = t0.float().contiguous(), k_first.long().contiguous(), counts.long().contiguous()
    box = aabb.float().contiguous().view(-1)
    occ = occupied.to(torch.uint8).contiguous()
    n_rays = o.shape[0]
    args = (_ptr(o), _ptr(d), _ptr(t0), _ptr(k_first), _ptr(counts), n_rays, float(step_size), _ptr(box), _ptr(occ),
            *occ.shape)
    kept, span = torch.empty(n_rays, dtype=torch.int64), torch.empty(n_rays, 2, dtype=torch.int64)
    lib.march(*args, 0, _ptr(kept), _ptr(span), None, None, None, None, torch.get_num_threads())
    first = torch.cumsum(kept, 0) - kept
    total = int(kept.sum())
    ray_indices = torch.empty(total, dtype=torch.int64)
    t_starts, t_ends = torch.empty(total), torch.empty(total)
    lib.march(*args, 1, None, _ptr(span), _ptr(first), _ptr(ray_indices), _ptr(t_starts), _ptr(t_ends),
              torch.get_num_threads())
    return ray_indices, t_starts, t_ends
