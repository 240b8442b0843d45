"""NeRSembleModel: deformation + hash-ensemble field + occupancy-grid ray marching + volume rendering.

Spaces: rays, boxes, depths and step sizes are in *model units* (metres x ``config.scene.world_scale``).
Camera-level entry points (:meth:`render_image`, :meth:`set_training_cameras`) take the pipeline's metric
OpenCV cameras and do the scaling themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import nograd
from ._random import randint
from .config import NeRSembleConfig
from .deformation import SE3DeformationField, deform_positions
from .field import NeRSembleField, TimeCodes, ensemble_weights
from .hash_encoding import Backend
from .kernels.cpu import build as cpu_build
from .kernels.cpu import ops as cpu_ops
from .kernels.registry import KernelError, check_twin, fall_back
from .occupancy import OccupancyGrid, frustum_visibility_mask
from .occupancy_filter import filter_occupancy
from .packed import segment_cumsum, segment_sum
from .rays import camera_rays, pixel_centers, scale_world_2_cam
from .rendering import render_samples
from .sampling import RaySamples, march_rays


VISIBILITY_SLAB = 16  # samples per ray evaluated at once by front-to-back early termination
# The fast path's slabs: 2 samples per ray first, doubling to 32 for the rays still alive. A trained head keeps
# under one sample a ray and most rays turn opaque within their first few, so a small first slab wastes few
# evaluations behind the surface; translucent rays soon reach slabs large enough that per-slab overhead is small.
FAST_SLABS = (2, 32)
QUERY_BLOCK = 4096  # samples per batched no-grad query on the CPU fast path: its intermediates stay in cache


@dataclass(frozen=True)
class Windows:
    """Warm-up state at one step: deformation PE window alpha (0..n_freq) and hash window (1..K)."""

    deformation: float
    hash: float


@dataclass
class Queried:
    """Field values of packed samples: density [S], colour [S, 3], deformation offset [S, 3]."""

    sigma: torch.Tensor
    rgb: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device: torch.device) -> Queried:
        return cls(torch.zeros(n, device=device), torch.zeros(n, 3, device=device), torch.zeros(n, 3, device=device))

    def select(self, keep: torch.Tensor) -> Queried:
        return Queried(self.sigma[keep], self.rgb[keep], self.offset[keep])


def _slab_ids(first: torch.Tensor, counts: torch.Tensor, alive: torch.Tensor, start: int, slab: int) -> torch.Tensor:
    """Sample ids ``start .. start + slab - 1`` of every alive ray (by ray, then by distance), in O(their number).

    The same ids, in the same order, as masking ``index_in_ray`` over all samples.
    """
    rays = torch.nonzero(alive & (counts > start))[:, 0]
    n = torch.clamp(counts[rays] - start, max=slab)
    base = torch.repeat_interleave(first[rays] + start, n)
    within = torch.arange(base.shape[0], device=base.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return base + within


def timestep_index(time: torch.Tensor | float, n_timesteps: int) -> torch.Tensor:
    """Upstream's ray time in [0, 1] -> timestep index ``round(time * (T - 1))``."""
    return torch.round(torch.as_tensor(time) * (n_timesteps - 1)).long()


class NeRSembleModel(nn.Module):
    """The whole NeRSemble model for one sequence of ``n_timesteps`` frames inside ``scene_box`` ([2, 3]).

    ``step`` arguments drive the warm-up schedules; ``step=None`` means "after training" (final windows), which
    is what upstream's evaluation and rendering see. ``self.training`` switches on stratified marching and
    alpha culling, as in nerfstudio.
    """

    def __init__(self, config: NeRSembleConfig, n_timesteps: int, scene_box: torch.Tensor | np.ndarray,
                 backend: Backend = "auto") -> None:
        super().__init__()
        if n_timesteps < 1:
            raise ValueError("need at least one timestep")
        self.config = config
        self.n_timesteps = n_timesteps
        box = torch.as_tensor(np.asarray(scene_box) if not torch.is_tensor(scene_box) else scene_box,
                              dtype=torch.float32).view(2, 3).clone()
        if not bool((box[1] > box[0]).all()):
            raise ValueError(f"scene box must have min < max per axis, got {box.tolist()}")
        self.register_buffer("scene_box", box)
        self.codes = TimeCodes(n_timesteps, config.hash.n_grids, config.codes)
        self.deformation = (SE3DeformationField(config.deformation, config.codes.deformation_dim)
                            if config.deformation.enabled else None)
        self.field = NeRSembleField(config.hash, config.field, box, backend)
        self.occupancy = OccupancyGrid(box, config.occupancy)
        # With the triton encoding, marching and compositing run fused Triton kernels too (where the encoding's
        # kernels run); False keeps their torch twins, e.g. to time one against the other.
        self.fused_packed = True
        self.packed_failure: str | None = None  # why the fused kernels stopped being used, if they did
        self._packed_checked: set[torch.device] = set()
        self._frozen_mlps: tuple | None = None  # inside _mlps_frozen: () until the first query builds the set

    # --- schedules and precision ----------------------------------------------------------------------

    def windows(self, step: int | None) -> Windows:
        return Windows(self.config.deformation.window.value(step), self.config.hash.window.value(step))

    def _autocast(self, device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
        """fp16 autocast on CUDA only; cache off because networks run first under no_grad, then with grad."""
        if enabled and self.config.train.mixed_precision and device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16, cache_enabled=False)
        return contextlib.nullcontext()

    # --- point queries ----------------------------------------------------------------------------------

    def canonical_positions(self, positions: torch.Tensor, timesteps: torch.Tensor,
                            windows: Windows) -> tuple[torch.Tensor, torch.Tensor]:
        """Warped (canonical) world positions and the applied offsets, ``[N, 3]`` each."""
        if self.deformation is None:
            return positions, torch.zeros_like(positions)
        return deform_positions(positions, self.scene_box, self.deformation, self.codes.deformation(timesteps),
                                windows.deformation, self.config.deformation.offset_units)

    def blend_weights(self, timesteps: torch.Tensor, windows: Windows) -> torch.Tensor:
        h = self.config.hash
        single = windows.hash == 1.0 and h.disable_initial_ensemble
        codes = None if single else self.codes.blend(timesteps)
        return ensemble_weights(codes, windows.hash, h.n_grids, h.disable_initial_ensemble, h.soft_transition,
                                n_samples=timesteps.shape[0], device=timesteps.device)

    def density(self, positions: torch.Tensor, timesteps: torch.Tensor, windows: Windows,
                mixed_precision: bool = True) -> torch.Tensor:
        """Density ``[N]`` at world positions, each at its own timestep index."""
        if self._fast_nograd(positions):
            return self._fast_query(positions, None, timesteps, windows, want_offset=False)[0]
        with self._autocast(positions.device, mixed_precision):
            canonical, _ = self.canonical_positions(positions, timesteps, windows)
            sigma, _ = self.field.density(canonical, self.blend_weights(timesteps, windows))
        return sigma.float()

    def query(self, positions: torch.Tensor, directions: torch.Tensor, timesteps: torch.Tensor,
              windows: Windows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Density ``[N]``, colour ``[N, 3]`` and deformation offset ``[N, 3]``, all float32."""
        if self._fast_nograd(positions):
            return self._fast_query(positions, directions, timesteps, windows)
        with self._autocast(positions.device):
            canonical, offset = self.canonical_positions(positions, timesteps, windows)
            sigma, geo = self.field.density(canonical, self.blend_weights(timesteps, windows))
            rgb = self.field.color(directions, geo)
        return sigma.float(), rgb.float(), offset.float()

    def _fast_nograd(self, positions: torch.Tensor) -> bool:
        """No autograd wanted, float32 on a CPU, and the C kernels are there: the batched no-grad query."""
        return (not torch.is_grad_enabled() and cpu_ops.applies(positions, self.field.encoding.table)
                and nograd.query_supported(self))

    def _fast_query(self, positions: torch.Tensor, directions: torch.Tensor | None, timesteps: torch.Tensor,
                    windows: Windows, want_offset: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`query` (or with ``directions`` None, :meth:`density`) with the elementwise chain in C.

        The MLPs run as batched matrix products (torch's GEMM is far faster than per-sample loops in C); the
        posenc before them and the SE(3) warp, box normalisation and hash encoding between them run per sample
        in C (:func:`cpu_ops.warp_encode`), so none of their many [N, ...] intermediates reaches memory. Blocks of
        ``QUERY_BLOCK`` samples keep every intermediate in cache.
        """
        n = positions.shape[0]
        deformation, field = self._nograd_mlps()
        eps, box_units = 0.0, False
        if self.deformation is not None:
            c = self.config.deformation
            eps, box_units = c.exp_map_eps, c.offset_units == "box"
        # One timestep for every sample (a render): the codes' share of the deformation is one bias row.
        codes_at: torch.Tensor | int = timesteps
        if n and bool((timesteps == timesteps[0]).all()):
            codes_at = int(timesteps[0])
        fparams = cpu_ops.box_params(self.scene_box, eps)
        encoding = self.field.encoding
        blend = self.blend_weights(timesteps, windows)
        shifted = None if directions is None else (directions + 1.0) / 2.0
        parts = []
        for i in range(0, n, QUERY_BLOCK):
            block = slice(i, i + QUERY_BLOCK)
            screw = None
            if deformation is not None:
                screw = deformation(positions[block], codes_at if isinstance(codes_at, int) else codes_at[block],
                                    windows.deformation)
            features, inside, offset = cpu_ops.warp_encode(encoding.table, encoding.cpu_geometry(), positions[block],
                                                           screw, blend[block], fparams, box_units, want_offset)
            sigma, rgb = field(features, inside, None if shifted is None else shifted[block])
            parts.append((sigma, rgb, offset))
        if not parts:
            return (torch.zeros(0), None if directions is None else torch.zeros(0, 3),
                    torch.zeros(0, 3) if want_offset else None)
        if len(parts) == 1:
            return parts[0]
        return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts, strict=True))

    def _nograd_mlps(self) -> tuple[nograd.NoGradDeformation | None, nograd.NoGradField]:
        """The MLP copies the fast query runs: built per query, except while :meth:`_mlps_frozen` holds one set
        for a span of queries in which the weights cannot change. A cache keyed on the tensors' version
        counters would go stale: torch's fused optimisers update parameters without moving them."""
        if self._frozen_mlps:
            return self._frozen_mlps
        deformation = (None if self.deformation is None else
                       nograd.NoGradDeformation(self.deformation, self.codes.deformation.weight, self.scene_box))
        mlps = deformation, nograd.NoGradField(self.field)
        if self._frozen_mlps is not None:  # inside _mlps_frozen: the first query builds the set the rest reuse
            self._frozen_mlps = mlps
        return mlps

    @contextlib.contextmanager
    def _mlps_frozen(self):
        """One set of no-grad MLP copies for every fast query inside: a render, one visibility pass or one
        occupancy update, none of which changes the weights. Built by the first query, so a span without
        queries (a step with no occupancy update) costs nothing. Nested uses keep the outermost set."""
        if self._frozen_mlps is not None:
            yield
            return
        self._frozen_mlps = ()
        try:
            yield
        finally:
            self._frozen_mlps = None

    # --- rays -------------------------------------------------------------------------------------------

    def _fused(self, tensor: torch.Tensor) -> bool:
        """Marching and compositing take the Triton kernels (:mod:`.kernels.cuda.packed`): the triton encoding
        (the only backend with ``uses_kernels``) runs its kernels on ``tensor``, i.e. it is on CUDA (or Triton's
        interpreter is on), :attr:`fused_packed` is set, and the kernels passed their first-use check here."""
        uses_kernels = getattr(self.field.encoding, "uses_kernels", None)
        if not (self.fused_packed and uses_kernels is not None and uses_kernels(tensor)):
            return False
        if tensor.device not in self._packed_checked:
            self._packed_checked.add(tensor.device)
            self._check_packed_kernels(tensor.device)
        return self.fused_packed

    def _check_packed_kernels(self, device: torch.device) -> None:
        """First use on ``device``: compile, launch and compare the fused marcher and compositor with their torch
        twins on a few rays. A failure keeps the twins for this model: one warning under ``auto``, an error with
        an explicit ``triton`` encoding (the encoding's ``strict``)."""
        from .kernels.cuda.launch import device_target  # noqa: PLC0415 - triton is optional

        generator = torch.Generator().manual_seed(0)
        counts = torch.tensor([3, 0, 4, 1, 2])
        ray_indices = torch.repeat_interleave(torch.arange(5), counts).to(device)
        t_starts = (torch.arange(10, dtype=torch.float32) * 0.1).to(device)
        sigmas = (torch.rand(10, generator=generator) * 5.0).to(device).requires_grad_()
        rgbs = torch.rand(10, 3, generator=generator).to(device).requires_grad_()

        def composite(fused: bool):
            return lambda s, c: torch.cat([part.reshape(-1) for part in render_samples(
                s, c, t_starts, t_starts + 0.1, ray_indices, 5, fused=fused)[1].__dict__.values()])

        box = self.scene_box
        rays_o = (box[0] - 0.1 * (box[1] - box[0])).expand(16, 3).contiguous().to(device)
        rays_d = torch.nn.functional.normalize(torch.rand(16, 3, generator=generator) + 0.2, dim=-1).to(device)
        occupied = (torch.rand(8, 8, 8, generator=generator) < 0.5).to(device)
        step = float((box[1] - box[0]).norm()) / 64

        def march(fused: bool):
            def run(_: torch.Tensor) -> torch.Tensor:
                samples = march_rays(rays_o, rays_d, box.to(device), step, occupied=occupied, fused=fused)
                return torch.cat([samples.ray_indices.float(), samples.t_starts])
            return run

        try:
            target = device_target(rays_o)
            with torch.enable_grad():  # the first use may come inside a no-grad render or marching pass
                check_twin("composite_fwd/composite_bwd", composite(True), composite(False), [sigmas, rgbs], target)
            check_twin("march_kernel", march(True), march(False), [rays_o], target)
        except KernelError as error:
            self.fused_packed = False
            self.packed_failure = fall_back(error, getattr(self.field.encoding, "strict", False),
                                            "the torch marching and compositing")

    def allow_kernel_fallback(self, allowed: bool = True) -> NeRSembleModel:
        """Whether a kernel that fails on first use falls back to its torch twin with a warning (the backend came
        from ``auto``) or raises (the backend was named). Only the ``triton`` encoding has kernels that can fail
        so; the C kernels always fall back (:mod:`.kernels.cpu.build`)."""
        if hasattr(self.field.encoding, "strict"):
            self.field.encoding.strict = not allowed
        return self

    def kernels_used(self) -> dict[str, object]:
        """Which implementation runs each part on the model's device, and why a kernel fell back, for reports."""
        encoding = self.field.encoding
        on_cpu = self.scene_box.device.type == "cpu"
        c_kernels = on_cpu and cpu_build.available()
        packed = "triton" if self._fused(self.scene_box) else ("c" if c_kernels else "torch")  # checks on first use
        name = "torch" if getattr(encoding, "failure", None) else encoding.backend
        if name == "torch" and c_kernels:
            name = "torch+c"  # the torch module, its float32 CPU work in the C kernels
        failures = [f for f in (getattr(encoding, "failure", None), self.packed_failure) if f]
        return {"encoding": name, "marching_compositing": packed, "fallbacks": failures}

    def _per_ray_timesteps(self, timesteps: torch.Tensor | int, n_rays: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=device).long()
        return t.expand(n_rays) if t.dim() == 0 else t

    def sample(self, rays_o: torch.Tensor, rays_d: torch.Tensor, timesteps: torch.Tensor, windows: Windows,
               generator: torch.Generator | None = None) -> tuple[RaySamples, Queried | None]:
        """Marched, occupancy-filtered samples, culled as nerfacc's ``render_visibility`` does.

        In training, samples with alpha below min(0.01, mean occ) are dropped; with ``early_stop_eps`` > 0
        (not upstream's setting), so are samples behind the point where transmittance falls below it, in
        training and rendering alike -- their weights are below eps, but they cost as much as visible ones.
        Outside training the culling pass already queries the whole field, and those values come back with
        the samples so nothing is evaluated twice (None when the caller still has to query).
        """
        s = self.config.sampler
        step_size = s.step_size if self.training else s.step_size / s.eval_substeps
        with torch.no_grad():
            samples = march_rays(rays_o, rays_d, self.scene_box, step_size, s.near_plane, s.far_plane,
                                 occupied=self.occupancy.occupied(), stratified=self.training and s.stratified,
                                 generator=generator, fused=self._fused(rays_o))
            cull_alpha = self.training and self.config.occupancy.enabled and s.alpha_threshold > 0
            if (cull_alpha or s.early_stop_eps > 0) and len(samples):
                threshold = self.occupancy.alpha_threshold(s.alpha_threshold) if cull_alpha else 0.0
                keep, values = self._visible(samples, rays_o, rays_d, timesteps, windows, threshold,
                                             full_query=not self.training)
                if bool(keep.all()):  # nothing culled (a render whose rays all stay translucent): no copies
                    return samples, values
                return samples.select(keep), (None if values is None else values.select(keep))
        return samples, None

    def _visible(self, samples: RaySamples, rays_o: torch.Tensor, rays_d: torch.Tensor, timesteps: torch.Tensor,
                 windows: Windows, alpha_threshold: float, full_query: bool) -> tuple[torch.Tensor, Queried | None]:
        """Which samples survive culling: alpha >= ``alpha_threshold`` and transmittance >= ``early_stop_eps``.

        With early termination the density is evaluated front to back, ``VISIBILITY_SLAB`` samples per ray at
        a time, and rays stop being evaluated once they are opaque: the inside of a head is never queried.
        ``full_query`` evaluates colour and offset too and returns them for every sample (zeros where skipped).
        """
        eps = self.config.sampler.early_stop_eps
        if self._fast_nograd(rays_o):
            return self._visible_fast(samples, rays_o, rays_d, timesteps, windows, alpha_threshold, full_query)
        n_rays = rays_o.shape[0]
        ray_ids = samples.ray_indices
        counts = torch.bincount(ray_ids, minlength=n_rays)
        index_in_ray = torch.arange(len(samples), device=ray_ids.device) - (torch.cumsum(counts, 0) - counts)[ray_ids]
        slab = VISIBILITY_SLAB if eps > 0 else int(counts.max())
        keep = torch.zeros(len(samples), dtype=torch.bool, device=ray_ids.device)
        values = Queried.zeros(len(samples), ray_ids.device) if full_query else None
        optical_depth = torch.zeros(n_rays, dtype=torch.float64, device=ray_ids.device)
        alive = torch.ones(n_rays, dtype=torch.bool, device=ray_ids.device)
        first = torch.cumsum(counts, 0) - counts
        quick = cpu_build.requested() and ray_ids.device.type == "cpu"
        for start in range(0, int(counts.max()), slab):
            if quick:  # only the slab's samples are touched, not every sample of the chunk per slab
                ids = _slab_ids(first, counts, alive, start, slab)
            else:
                ids = torch.nonzero((index_in_ray >= start) & (index_in_ray < start + slab) & alive[ray_ids])[:, 0]
            if ids.numel() == 0:
                break
            part = samples.select(ids)
            positions, part_t = part.positions(rays_o, rays_d), timesteps[part.ray_indices]
            if values is None:
                sigma = self.density(positions, part_t, windows)
            else:
                sigma, rgb, offset = self.query(positions, rays_d[part.ray_indices], part_t, windows)
                values.sigma[ids], values.rgb[ids], values.offset[ids] = sigma, rgb, offset
            tau = sigma * part.deltas
            visible = (1.0 - torch.exp(-tau)) >= alpha_threshold
            if eps > 0:
                before = optical_depth[part.ray_indices] + segment_cumsum(tau, part.ray_indices, n_rays,
                                                                          exclusive=True).double()
                visible &= torch.exp(-before) >= eps
                optical_depth += segment_sum(tau.double(), part.ray_indices, n_rays)
                alive = torch.exp(-optical_depth) >= eps
            keep[ids] = visible
        return keep, values

    def _visible_fast(self, samples: RaySamples, rays_o: torch.Tensor, rays_d: torch.Tensor, timesteps: torch.Tensor,
                      windows: Windows, alpha_threshold: float,
                      full_query: bool) -> tuple[torch.Tensor, Queried | None]:
        """:meth:`_visible` with the slab bookkeeping in C (:class:`cpu_ops.FrontToBack`); the same samples are kept.

        Which samples are kept depends only on each sample's alpha and the optical depth in front of it, not on
        how many samples per ray a slab evaluates: a ray stops once it is opaque, and every sample behind that
        point would have been dropped anyway. The slab size trades evaluations wasted behind that point against
        per-slab overhead; it does not change the result.
        """
        eps = self.config.sampler.early_stop_eps
        state = cpu_ops.FrontToBack(samples.ray_indices, samples.t_starts, samples.t_ends, rays_o, rays_d, timesteps,
                                 full_query)
        slab = FAST_SLABS[0] if eps > 0 else max(int(state.counts.max()), 1)
        with self._mlps_frozen():
            while True:
                ids, ray_ids, positions, directions, part_t = state.take(slab)
                if ids.numel() == 0:
                    break
                slab = min(slab * 2, FAST_SLABS[1])
                if full_query:
                    sigma, rgb, offset = self._fast_query(positions, directions, part_t, windows)
                else:
                    sigma, rgb, offset = self._fast_query(positions, None, part_t, windows, want_offset=False)
                state.update(ids, ray_ids, sigma, rgb, offset, alpha_threshold, eps)
        keep = state.keep.bool()
        values = Queried(state.sigma, state.rgb, state.offset) if full_query else None
        return keep, values

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor, timesteps: torch.Tensor | int,
                step: int | None = None, generator: torch.Generator | None = None) -> dict[str, object]:
        """Render rays (model units, unit directions) at per-ray timestep indices.

        Returns ``rgb [N, 3]`` (over the white background; clamped to [0, 1] in eval), ``alpha [N]``
        (accumulated opacity), ``depth [N]`` (expected distance along the ray), ``deformation [N, 3]``
        (weight-averaged offset, for visualisation), and for the losses ``weights [S]`` and ``samples``
        (:class:`RaySamples`, packed by ray).
        """
        n_rays = rays_o.shape[0]
        timesteps = self._per_ray_timesteps(timesteps, n_rays, rays_o.device)
        windows = self.windows(step)
        samples, queried = self.sample(rays_o, rays_d, timesteps, windows, generator)
        if queried is None:
            queried = Queried(*self.query(samples.positions(rays_o, rays_d), rays_d[samples.ray_indices],
                                          timesteps[samples.ray_indices], windows))
        sigma, rgb, offset = queried.sigma, queried.rgb, queried.offset
        weights, out = render_samples(sigma, rgb, samples.t_starts, samples.t_ends, samples.ray_indices, n_rays,
                                      self.config.field.background_color, fused=self._fused(sigma))
        rgb_out = out.rgb if self.training else torch.clamp(torch.nan_to_num(out.rgb), 0.0, 1.0)
        return {
            "rgb": rgb_out,
            "alpha": out.accumulation,
            "depth": out.depth,
            "deformation": segment_sum(weights[:, None] * offset, samples.ray_indices, n_rays),
            "weights": weights,
            "samples": samples,
        }

    # --- occupancy grid ---------------------------------------------------------------------------------

    @torch.no_grad()
    def update_occupancy(self, step: int, generator: torch.Generator | None = None) -> bool:
        """Call once per training step before the forward pass; updates every ``update_every`` steps.

        Each probe gets its own random timestep. Upstream's callback order makes the update at step s use
        the windows of step s - 1, reproduced here. Runs without autocast, as upstream.
        """
        windows = self.windows(max(step - 1, 0))
        step_size = self.config.sampler.step_size

        def occ_eval(points: torch.Tensor) -> torch.Tensor:
            t = randint(self.n_timesteps, (points.shape[0],), points.device, generator)
            return self.density(points, t, windows, mixed_precision=False) * step_size

        with self._mlps_frozen():
            return self.occupancy.update(step, occ_eval, generator)

    def set_training_cameras(self, intrinsics: Sequence[np.ndarray], world_2_cams: Sequence[np.ndarray],
                             sizes: Sequence[tuple[int, int]]) -> None:
        """Mask out cells seen by fewer than ``frustum_min_cameras`` training cameras (metric cameras)."""
        min_cameras = self.config.occupancy.frustum_min_cameras
        if min_cameras <= 0:
            return
        scaled = [scale_world_2_cam(w2c, self.config.scene.world_scale) for w2c in world_2_cams]
        mask = frustum_visibility_mask(self.scene_box.cpu(), self.config.occupancy.resolution, intrinsics, scaled,
                                       sizes, min_cameras)
        self.occupancy.set_visibility(mask)

    @torch.no_grad()
    def filter_occupancy(self) -> int:
        """Upstream's evaluation-time filter: keep the largest connected blob of occupied cells (plus a margin).

        Changes the binary grid in place (call it once, before evaluation renders); returns the number of
        occupied cells it switched off.
        """
        e, grid = self.config.eval, self.occupancy
        r = grid.resolution
        keep = filter_occupancy(grid.occs.view(r, r, r), e.filter_threshold, e.filter_sigma_thinning,
                                e.filter_sigma_erosion, occupied=grid.occupied())
        before = int(grid.binary.sum())
        grid.binary &= keep
        return before - int(grid.binary.sum())

    def restrict_occupancy(self, mask: torch.Tensor) -> None:
        """Also switch off the cells where ``mask`` ([R, R, R] bool) is False, e.g. outside the visual hull."""
        self.occupancy.set_visibility(self.occupancy.visible & mask.to(self.occupancy.visible.device))

    # --- optimisation -----------------------------------------------------------------------------------

    def param_groups(self, config: NeRSembleConfig | None = None) -> list[dict]:
        """The three Adam groups with their learning rates: fields, deformation_field, embeddings."""
        o = (config or self.config).optim
        groups = [
            {"name": "fields", "params": list(self.field.parameters()), "lr": o.lr_fields},
            {"name": "deformation_field", "params": list(self.deformation.parameters()) if self.deformation else [],
             "lr": o.lr_deformation},
            {"name": "embeddings", "params": list(self.codes.parameters()), "lr": o.lr_embeddings},
        ]
        return [g for g in groups if g["params"]]

    # --- whole images -----------------------------------------------------------------------------------

    @torch.no_grad()
    def render_image(self, K: np.ndarray | torch.Tensor, world_2_cam: np.ndarray | torch.Tensor, width: int,
                     height: int, timestep: int, chunk: int | None = None,
                     step: int | None = None) -> dict[str, torch.Tensor]:
        """Render a metric OpenCV camera at one timestep, ``chunk`` rays at a time (bounded memory).

        Uses evaluation semantics whatever the module's mode (no jitter, no culling, the marching step divided by
        ``sampler.eval_substeps``, RGB clamped; final windows unless ``step`` is given). Returns ``rgb (H, W, 3)``,
        ``alpha (H, W)``, ``depth (H, W)`` (distance along the ray, metres) and ``z_depth (H, W)`` (metres), on the
        model's device. Depth is 0 where a ray met no sample (the capture store's "invalid"), rather than the
        chunk's nearest sample distance that nerfstudio's clipping would give: the image must not depend on
        ``chunk``.
        """
        was_training = self.training
        self.eval()
        try:
            device = self.scene_box.device
            chunk = chunk or self.config.eval.chunk
            rays = camera_rays(K, world_2_cam, pixel_centers(width, height, device), self.config.scene.world_scale)
            parts: dict[str, list[torch.Tensor]] = {"rgb": [], "alpha": [], "depth": []}
            with self._mlps_frozen():
                for start in range(0, rays.origins.shape[0], chunk):
                    sl = slice(start, start + chunk)
                    out = self.forward(rays.origins[sl], rays.directions[sl], timestep, step=step)
                    for key in parts:
                        parts[key].append(out[key])
        finally:
            self.train(was_training)
        scale = self.config.scene.world_scale
        alpha = torch.cat(parts["alpha"])
        depth = torch.where(alpha > 0, torch.cat(parts["depth"]) / scale, torch.zeros_like(alpha))
        return {
            "rgb": torch.cat(parts["rgb"]).view(height, width, 3),
            "alpha": alpha.view(height, width),
            "depth": depth.view(height, width),
            "z_depth": (depth * rays.z_dirs).view(height, width),
        }
