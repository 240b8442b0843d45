"""The hash-grid ensemble: K multiresolution hash grids that share one hash function, blended per sample.

Upstream packs 32 logical grids x 2 features into 8 tcnn HashGrids with 8 features per level; since every
grid shares resolutions and hashing, the ensemble is one hash grid whose entries hold K*F features. That is
how the ``torch`` backend stores it: one parameter ``table[E, K*F]`` over all levels (tcnn's per-level offsets
and sizes, so E = 6,299,960 for the paper config), which lets a single fused gather-and-interpolate
(``embedding_bag``) serve all K grids from 8 corner indices computed once per point and level.

Backends behind :func:`make_encoding` compute the same function:
- ``reference``: per-grid, per-level, per-corner loops with tcnn's index function written out literally
  (:mod:`stages.nersemble._reference`). Slow and obvious; tests and benchmarks hold the others against it.
- ``torch``: vectorised, device-agnostic; the fallback where nothing faster runs. On float32 CPU tensors it
  runs the C kernels (:mod:`.kernels.cpu`), for which its own torch code is the twin.
- ``triton``: fused Triton kernels over the same ``table`` parameter (:mod:`.kernels.cuda.hash_encoding`), for
  CUDA GPUs without tiny-cuda-nn; needs only the ``triton`` wheel that CUDA builds of torch bring along.
- ``tcnn``: tiny-cuda-nn HashGrids (CUDA only) with the same layout, when ``tinycudann`` imports.
:func:`stages.nersemble.encodings.make_encoding` builds one; :mod:`.kernels.registry` says what ``auto`` means.

Inputs are positions in [0, 1]^3 (the field maps samples outside the scene box to 0 first). Hashing mimics
tcnn exactly, including uint32 wrap-around (emulated in int64) and the wrap-around of the dense coarse
levels at the upper border that tcnn's +0.5 offset causes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import HashEnsembleConfig
from .kernels.cpu import ops as cpu_ops
from .kernels.layout import grid_layout
from .kernels.registry import KernelError, check_twin, fall_back

PRIMES = (1, 2654435761, 805459861)  # tcnn's coherent_prime_hash factors for 3-D inputs
UINT32 = 0xFFFFFFFF

Backend = Literal["auto", "torch", "triton", "tcnn", "reference"]


class HashEnsembleEncoding(nn.Module):
    """Interface: ``forward(x[N,3] in [0,1], blend[N,K]) -> [N, L*F]`` (level-major, then feature).

    ``blend`` holds each sample's final per-grid weights (codes after the warm-up rules and the grid window,
    see :mod:`stages.nersemble.field`); ``grid_features`` gives the unblended ``[N, L, K, F]`` features.
    """

    def __init__(self, config: HashEnsembleConfig) -> None:
        super().__init__()
        self.n_grids = config.n_grids
        self.n_levels = config.n_levels
        self.features_per_level = config.features_per_level
        self.layout = grid_layout(config.n_levels, config.base_resolution, config.per_level_scale,
                                  config.log2_table_size)
        self.config = config

    @property
    def out_dim(self) -> int:
        return self.n_levels * self.features_per_level

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
        features = self.grid_features(x)  # [N, L, K, F]
        # Blending after interpolation touches L*K*F values per sample instead of 8*L*K*F.
        blended = torch.einsum("nlkf,nk->nlf", features, blend.to(features.dtype))
        return blended.reshape(x.shape[0], self.out_dim)


class TorchHashEnsemble(HashEnsembleEncoding):
    """Vectorised pure-torch backend; all K grids live in one ``table[E, K*F]`` parameter."""

    backend = "torch"

    def __init__(self, config: HashEnsembleConfig, table: nn.Parameter | None = None) -> None:
        """``table``: share an existing ``[E, K*F]`` parameter (e.g. to run two backends on one table)."""
        super().__init__(config)
        layout = self.layout
        width = self.n_grids * self.features_per_level
        if table is None:
            table = nn.Parameter(torch.empty(layout.n_entries, width).uniform_(-config.init_scale, config.init_scale))
        elif tuple(table.shape) != (layout.n_entries, width):
            raise ValueError(f"table has shape {tuple(table.shape)}, the config needs {(layout.n_entries, width)}")
        self.table = table
        # Level geometry as buffers so it follows the module across devices; not saved in checkpoints.
        self.register_buffer("scales", torch.tensor(layout.scales, dtype=torch.float32), persistent=False)
        self.register_buffer("resolutions", torch.tensor(layout.resolutions, dtype=torch.int64), persistent=False)
        self.register_buffer("sizes", torch.tensor(layout.sizes, dtype=torch.int64), persistent=False)
        self.register_buffer("offsets", torch.tensor(layout.offsets, dtype=torch.int64), persistent=False)
        self._cpu_geometry: cpu_ops.Geometry | None = None

    def corners(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat table rows ``[L, N, 8]`` of every point's 8 cell corners and its in-cell position ``[L, N, 3]``.

        Level-major so that each level group (dense prefix, hashed rest) is a contiguous block. ``frac``
        carries the autograd path to ``x`` (d frac / dx = s_l; floor has zero gradient), which is exactly the
        input gradient tcnn computes.
        """
        pos = x[None, :, :] * self.scales.to(x.dtype)[:, None, None] + 0.5  # [L, N, 3]
        cell = torch.floor(pos)
        frac = pos - cell
        cx, cy, cz = cell.detach().long().unbind(dim=2)  # lower corner coordinate per axis, [L, N] each
        index = torch.empty(self.n_levels, x.shape[0], 8, dtype=torch.int64, device=x.device)
        n_dense = self.layout.n_dense
        if n_dense:
            # x + y*res + z*res^2 in uint32 (the & emulates the wrap for negative inputs), then mod size:
            # the +1 corner at the upper border wraps around exactly as in tcnn's dense levels.
            d = slice(0, n_dense)
            res = self.resolutions[d, None]
            dense = _combine_corners(_pair(cx[d]), _pair(cy[d], res), _pair(cz[d], res * res), torch.add) & UINT32
            torch.remainder(dense, self.sizes[d, None, None], out=index[d])
        if n_dense < self.n_levels:
            # Hashed levels have power-of-two sizes, so mod is a mask; the low 32 bits of int64 products and
            # XORs equal tcnn's uint32 arithmetic, so no intermediate masking is needed.
            h = slice(n_dense, self.n_levels)
            hashed = _combine_corners(_pair(cx[h]), _pair(cy[h], PRIMES[1]), _pair(cz[h], PRIMES[2]),
                                      torch.bitwise_xor)
            torch.bitwise_and(hashed, self.sizes[h, None, None] - 1, out=index[h])
        index += self.offsets[:, None, None]
        return index.view(self.n_levels, x.shape[0], 8), frac

    def interpolated(self, x: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Trilinearly interpolated features of all grids, ``[L, N, K, F]`` (``table``: another one of this shape)."""
        index, frac = self.corners(x)
        out = trilinear_rows(index, frac, self.table if table is None else table)  # [L, N, K*F]
        return out.view(self.n_levels, x.shape[0], self.n_grids, self.features_per_level)

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.interpolated(x).transpose(0, 1)

    def forward(self, x: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
        if cpu_ops.fits(self.n_levels, self.table.shape[1]) and cpu_ops.applies(x, blend, self.table):
            return cpu_ops.hash_ensemble(x, blend, self.table, self.cpu_geometry())  # this class is the twin
        return self.reference_forward(x, blend)

    def cpu_geometry(self) -> cpu_ops.Geometry:
        """The level geometry as the C kernels read it (built once)."""
        if self._cpu_geometry is None:
            self._cpu_geometry = cpu_ops.Geometry(self.layout, self.n_grids, self.features_per_level)
        return self._cpu_geometry

    def reference_forward(self, x: torch.Tensor, blend: torch.Tensor, table: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """The vectorised torch path: the kernels' reference twin, and the path where none runs."""
        rows = self.interpolated(x, table).flatten(2)  # [L, N, K*F]
        # Blending after interpolation touches L*K*F values per sample instead of 8*L*K*F. Each grid's
        # weight is repeated over its F columns so the product broadcasts over levels only (contiguous
        # rows); an einsum here permutes and copies the features on every call.
        per_column = blend.to(rows.dtype).repeat_interleave(self.features_per_level, dim=1)  # [N, K*F]
        levels, n = rows.shape[:2]
        blended = (rows * per_column).view(levels, n, self.n_grids, self.features_per_level).sum(2)
        return blended.transpose(0, 1).reshape(n, self.out_dim)


class TritonHashEnsemble(TorchHashEnsemble):
    """The ``triton`` backend: :class:`TorchHashEnsemble`'s parameter and state, forward on Triton kernels.

    It adds nothing to the state (same ``table``, same non-persistent level buffers), so a state_dict or a
    checkpoint moves between the two backends unchanged. On CPU tensors it runs the inherited path, so a model
    built for ``triton`` still renders after ``.cpu()``; ``TRITON_INTERPRET=1`` runs the kernels there instead.

    First use on a device, for each pattern of inputs that need gradients: the kernels are compiled, launched
    and compared with the torch twin on a handful of points. A failure there (no Triton support for the GPU, an
    old driver, a toolchain problem, wrong values) is a :class:`KernelError` naming the kernel and the device:
    with ``strict`` (``--encoding triton``) it is raised; otherwise one warning, and this module runs the torch
    path from then on (:attr:`failure` says why), so a training run never dies mid-way for it.
    """

    backend = "triton"

    def __init__(self, config: HashEnsembleConfig, table: nn.Parameter | None = None, block_n: int | None = None,
                 strict: bool = True) -> None:
        super().__init__(config, table)
        from .kernels.cuda import hash_encoding as kernels  # noqa: PLC0415 - triton is an optional dependency

        self._kernels = kernels
        self.block_n = block_n or kernels.block_points(self.n_grids, self.features_per_level)
        self.strict = strict
        self.failure: str | None = None
        self._levels = None
        self._checked: set[tuple] = set()

    def uses_kernels(self, x: torch.Tensor) -> bool:
        """Kernels run on CUDA tensors (on CPU tensors only under Triton's interpreter), unless they failed."""
        return self.failure is None and (x.is_cuda or self._kernels.kernels_interpreted())

    def _level_tables(self, device: torch.device):
        if self._levels is None or self._levels.scales.device != device:
            self._levels = self._kernels.LevelTables(self.layout, device)
        return self._levels

    def forward(self, x: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 3 or blend.shape != (x.shape[0], self.n_grids):
            raise ValueError(f"expected x [N, 3] and blend [N, {self.n_grids}], got {tuple(x.shape)} and "
                             f"{tuple(blend.shape)}")
        if self.uses_kernels(x):
            grads = torch.is_grad_enabled() and (x.requires_grad, blend.requires_grad, self.table.requires_grad)
            key = (x.device, grads)
            if key not in self._checked:
                self._checked.add(key)
                self._first_use(x, blend, grads or (False, False, False))
        if not self.uses_kernels(x):
            return super().forward(x, blend)
        return self._kernels.hash_ensemble(x, blend, self.table, self._level_tables(x.device), self.n_grids,
                                           self.features_per_level, self.block_n)

    def _first_use(self, x: torch.Tensor, blend: torch.Tensor, needs: tuple[bool, bool, bool]) -> None:
        """Compile, launch and check the kernels this call will run, on a few of its own points.

        The check's table is a small one of the same grids, levels and features: those (and the point count's
        specialisation) are what a kernel is compiled for, the table's size is not, and a copy of the real table
        with two dense gradients would cost three times the paper's 1.6 GB on the GPU.
        """
        from .kernels.cuda.launch import device_target  # noqa: PLC0415 - triton is optional

        small = TorchHashEnsemble(replace(self.config, log2_table_size=min(self.config.log2_table_size, 12)))
        small = small.to(x.device)
        with torch.no_grad():
            small.table.normal_(generator=torch.Generator(device=x.device).manual_seed(0))  # O(1) values
        levels = self._kernels.LevelTables(small.layout, x.device)
        n = min(x.shape[0], 37)  # not a multiple of 16: the generic integer specialisation, a partial block
        inputs = [x[:n].detach().float().clone().requires_grad_(needs[0]),
                  blend[:n].detach().float().clone().requires_grad_(needs[1]),
                  small.table.detach().requires_grad_(needs[2])]

        def kernels(x_: torch.Tensor, blend_: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
            return self._kernels.hash_ensemble(x_, blend_, table, levels, self.n_grids, self.features_per_level,
                                               self.block_n)

        try:
            with torch.enable_grad():
                check_twin("hash_ensemble", kernels, small.reference_forward, inputs, device_target(x))
        except KernelError as error:
            self.failure = fall_back(error, self.strict, "the torch encoding")


def _pair(low: torch.Tensor, factor: torch.Tensor | int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The lower and upper corner coordinate of one axis, each times ``factor`` (``(low + 1) * f = low * f + f``)."""
    lower = low if isinstance(factor, int) and factor == 1 else low * factor
    return lower, lower + factor


def _combine_corners(ax: tuple[torch.Tensor, torch.Tensor], ay: tuple[torch.Tensor, torch.Tensor],
                     az: tuple[torch.Tensor, torch.Tensor],
                     op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``op(op(ax_i, ay_j), az_k)`` for all 8 corners -> ``[..., 8]``, x slowest and z fastest.

    Whole-tensor ops on ``[...]`` operands: broadcasting ``[..., 2]`` pairs is several times slower on a CPU.
    """
    xy = [op(ax[i], ay[j]) for i in (0, 1) for j in (0, 1)]
    return torch.stack([op(p, az[k]) for p in xy for k in (0, 1)], dim=-1)


class _CornerWeights:
    """Trilinear corner weights of in-cell positions ``frac[..., 3]`` and their derivatives, ``[..., 8]`` each.

    Corners are ordered as in :func:`_combine_corners` (x slowest, z fastest). Every product is an elementwise
    op on whole ``[...]`` tensors: broadcasting ``[..., 2]`` axis pairs against each other (the textbook
    outer product) runs several times slower on a CPU, because the innermost dimension is only 2 long.
    """

    def __init__(self, frac: torch.Tensor) -> None:
        f = frac.unbind(-1)
        self.axes = [(1.0 - fa, fa) for fa in f]  # (weight of the lower corner, of the upper one) per axis
        self.yz = self._pairs(1, 2)

    def _pairs(self, a: int, b: int) -> list[torch.Tensor]:
        """Products of two axes' weights, index ``[i * 2 + j]`` (i for axis ``a``, j for axis ``b``)."""
        wa, wb = self.axes[a], self.axes[b]
        return [wa[i] * wb[j] for i in (0, 1) for j in (0, 1)]

    def values(self) -> torch.Tensor:
        wx = self.axes[0]
        return torch.stack([wx[i] * yz for i in (0, 1) for yz in self.yz], dim=-1)

    def d_dx(self) -> torch.Tensor:
        """d w_c / d frac_x: -w_yz for the lower x corners, +w_yz for the upper ones."""
        yz = torch.stack(self.yz, dim=-1)
        return torch.cat([-yz, yz], dim=-1)

    def d_dy(self) -> torch.Tensor:
        xz = self._pairs(0, 2)
        return torch.stack([-xz[0], -xz[1], xz[0], xz[1], -xz[2], -xz[3], xz[2], xz[3]], dim=-1)

    def d_dz(self) -> torch.Tensor:
        xy = self._pairs(0, 1)
        return torch.stack([-xy[0], xy[0], -xy[1], xy[1], -xy[2], xy[2], -xy[3], xy[3]], dim=-1)


def _corner_weights(frac: torch.Tensor) -> torch.Tensor:
    """Trilinear weights ``[..., 8]`` in the corner order of :func:`_combine_corners`."""
    return _CornerWeights(frac).values()


class _TrilinearRows(torch.autograd.Function):
    """``out[l, n] = sum_c w_c(frac[l, n]) * table[index[l, n, c]]`` with a hand-written backward.

    Forward: one ``embedding_bag`` (a fused gather + weighted sum). Backward: the input gradient is three
    more ``embedding_bag`` calls with the weight derivatives d w_c / d f_axis as per-sample weights, and
    the table gradient one ``index_add_``. Autograd would instead sort the indices (embedding_bag's CPU
    backward), gather all 8 corner rows again and build a dozen broadcast ops: several times slower.
    """

    @staticmethod
    def forward(ctx, index: torch.Tensor, frac: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        levels, n = index.shape[:2]
        weights = _corner_weights(frac.detach().to(table.dtype))
        ctx.save_for_backward(index, frac, table)
        out = F.embedding_bag(index.view(-1, 8), table, per_sample_weights=weights.view(-1, 8), mode="sum")
        return out.view(levels, n, table.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        index, frac, table = ctx.saved_tensors
        width = table.shape[1]
        grad_out = grad_out.to(table.dtype).reshape(-1, width)
        flat_index = index.view(-1, 8)
        weights = _CornerWeights(frac.to(table.dtype).reshape(-1, 3))
        grad_frac = grad_table = None
        if ctx.needs_input_grad[1]:
            parts = []
            for d_weights in (weights.d_dx(), weights.d_dy(), weights.d_dz()):
                d_out = F.embedding_bag(flat_index, table, per_sample_weights=d_weights, mode="sum")
                parts.append((d_out * grad_out).sum(-1))
            grad_frac = torch.stack(parts, dim=-1).view(frac.shape).to(frac.dtype)
        if ctx.needs_input_grad[2]:
            contributions = (weights.values()[:, :, None] * grad_out[:, None, :]).view(-1, width)
            grad_table = torch.zeros_like(table).index_add_(0, flat_index.reshape(-1), contributions)
        return None, grad_frac, grad_table


def trilinear_rows(index: torch.Tensor, frac: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of table rows: ``index[L, N, 8]``, ``frac[L, N, 3]`` -> ``[L, N, C]``."""
    return _TrilinearRows.apply(index, frac, table)


class TcnnHashEnsemble(HashEnsembleEncoding):
    """tiny-cuda-nn backend: ceil(K*F / 8) HashGrids with (up to) 8 features per level, as upstream packs them.

    Feature column c*8 + j of the concatenated tcnn outputs is column c*8 + j of the torch backend's table
    (grid k = column // F), so :meth:`load_table` moves parameters between the two exactly.
    """

    backend = "tcnn"

    def __init__(self, config: HashEnsembleConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__(config)
        import tinycudann as tcnn  # noqa: PLC0415 - optional dependency, CUDA only

        width = self.n_grids * self.features_per_level
        self.features_per_encoding = 8 if width >= 8 else 1 << math.ceil(math.log2(width))
        n_encodings = math.ceil(width / self.features_per_encoding)
        encoding_config = {
            "otype": "HashGrid",
            "n_levels": config.n_levels,
            "n_features_per_level": self.features_per_encoding,
            "log2_hashmap_size": config.log2_table_size,
            "base_resolution": config.base_resolution,
            "per_level_scale": config.per_level_scale,
            "interpolation": "Linear",
        }
        kwargs = {} if dtype is None else {"dtype": dtype}
        self.encodings = nn.ModuleList(
            tcnn.Encoding(n_input_dims=3, encoding_config=encoding_config, seed=1337 + i, **kwargs)
            for i in range(n_encodings)
        )
        expected = self.layout.n_entries * self.features_per_encoding
        if self.encodings[0].params.numel() != expected:
            raise RuntimeError(f"tcnn grid has {self.encodings[0].params.numel()} parameters, the torch layout "
                               f"expects {expected}: the level layouts disagree")

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.float().contiguous()
        outs = [enc(x).float().view(n, self.n_levels, self.features_per_encoding) for enc in self.encodings]
        width = self.n_grids * self.features_per_level
        return torch.cat(outs, dim=-1)[..., :width].reshape(n, self.n_levels, self.n_grids, self.features_per_level)

    @torch.no_grad()
    def load_table(self, table: torch.Tensor) -> None:
        """Copy a torch-backend ``table[E, K*F]`` into the tcnn parameters (tcnn layout: entry-major)."""
        fpe = self.features_per_encoding
        padded = torch.zeros(table.shape[0], fpe * len(self.encodings), dtype=torch.float32, device=table.device)
        padded[:, :table.shape[1]] = table
        for i, enc in enumerate(self.encodings):
            enc.params.copy_(padded[:, i * fpe:(i + 1) * fpe].reshape(-1).to(enc.params))

    def export_table(self) -> torch.Tensor:
        """The parameters in the torch backend's ``[E, K*F]`` layout (a copy)."""
        fpe = self.features_per_encoding
        parts = [enc.params.detach().float().view(-1, fpe) for enc in self.encodings]
        return torch.cat(parts, dim=1)[:, :self.n_grids * self.features_per_level]
