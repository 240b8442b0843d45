"""Reference twins of the hash-ensemble encoding: slow, literal and obviously correct (STYLE.md section 6).

Training never builds these twins. The tests and benchmarks hold every fast backend (``torch`` and
``triton`` in :mod:`stages.nersemble.hash_encoding`, ``tcnn``) against
:class:`ReferenceHashEnsemble`, which reads the same ``table`` parameter through tcnn's index function written
out per grid, level and corner.
"""

from __future__ import annotations

import itertools

import torch

from .hash_encoding import PRIMES, UINT32, HashEnsembleEncoding, TorchHashEnsemble


def tcnn_grid_index(coords: list[torch.Tensor], resolution: int, size: int, hashed_level: bool) -> torch.Tensor:
    """tcnn's ``grid_index`` for integer corner coordinates (one int64 tensor per axis), written out literally.

    Coordinates are first cast to uint32 (as tcnn's ``(uint32_t)(int)floor``); arithmetic wraps mod 2^32.
    """
    coords = [c & UINT32 for c in coords]
    stride = 1
    index = torch.zeros_like(coords[0])
    for dim in range(3):
        if stride > size:
            break
        index = (index + coords[dim] * stride) & UINT32
        stride *= resolution
    if hashed_level and size < stride:
        index = torch.zeros_like(coords[0])
        for dim in range(3):
            index = index ^ ((coords[dim] * PRIMES[dim]) & UINT32)
    return index % size

class ReferenceHashEnsemble(TorchHashEnsemble):
    """Per-grid, per-level, per-corner loops over the same table: the obviously-correct twin of ``torch``."""

    backend = "reference"

    def forward(self, x: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
        return HashEnsembleEncoding.forward(self, x, blend)  # interpolate per grid, then blend

    def grid_features(self, x: torch.Tensor) -> torch.Tensor:
        layout, f = self.layout, self.features_per_level
        # Per level and corner: tcnn's index function, written out, and the trilinear weight.
        rows, weights = [], []
        for level in range(self.n_levels):
            pos = x * torch.tensor(layout.scales[level], dtype=torch.float32).to(x) + 0.5
            cell = torch.floor(pos)
            frac = pos - cell
            cell = cell.long()
            for corner in itertools.product((0, 1), repeat=3):
                coords = [cell[:, d] + corner[d] for d in range(3)]
                index = tcnn_grid_index(coords, layout.resolutions[level], layout.sizes[level],
                                        hashed_level=not layout.dense[level])
                rows.append(layout.offsets[level] + index)
                weight = torch.ones_like(frac[:, 0])
                for d in range(3):
                    weight = weight * (frac[:, d] if corner[d] else 1.0 - frac[:, d])
                weights.append(weight)
        rows_t = torch.stack(rows, dim=1)  # [N, L * 8], level-major then corner
        # One split and one read per grid: reading a slice of a big parameter once per corner would make
        # autograd build (and zero) a table-sized gradient for every single lookup.
        grids = self.table.split(f, dim=1)
        per_grid = []
        for k in range(self.n_grids):
            grid_rows = grids[k][rows_t]  # [N, L * 8, F]
            per_level = []
            for level in range(self.n_levels):
                acc = torch.zeros(x.shape[0], f, dtype=self.table.dtype, device=x.device)
                for c in range(8):
                    j = level * 8 + c
                    acc = acc + weights[j][:, None].to(acc.dtype) * grid_rows[:, j]
                per_level.append(acc)
            per_grid.append(torch.stack(per_level, dim=1))  # [N, L, F]
        return torch.stack(per_grid, dim=2)  # [N, L, K, F]
