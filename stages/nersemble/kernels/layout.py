"""tcnn's multiresolution hash-grid layout: level scales, resolutions, sizes and offsets in one flat table.

Every backend of the hash ensemble (torch, the C kernels, Triton, tcnn) reads the same ``table[E, K*F]`` through
this layout, which is why a checkpoint moves between them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GridLayout:
    """Per-level geometry of a tcnn HashGrid, computed as tcnn computes it (float32 on the host)."""

    scales: tuple[float, ...]  # s_l: an input p maps to p * s_l + 0.5
    resolutions: tuple[int, ...]  # ceil(s_l) + 1
    sizes: tuple[int, ...]  # entries in level l: min(next_multiple(res^3, 8), 2^log2)
    offsets: tuple[int, ...]  # first entry of level l in the flat table
    dense: tuple[bool, ...]  # res^3 fits the level: direct indexing, else spatial hash

    @property
    def n_entries(self) -> int:
        return self.offsets[-1] + self.sizes[-1]

    @property
    def n_dense(self) -> int:
        """Dense levels form a prefix, since resolutions never decrease with the level."""
        return sum(self.dense)


def grid_layout(n_levels: int, base_resolution: int, per_level_scale: float, log2_table_size: int) -> GridLayout:
    """tcnn's level scales, resolutions and parameter offsets (grid.h), in float32 like tcnn's host code."""
    log2_scale = np.log2(np.float32(per_level_scale))
    table_size = 1 << log2_table_size
    scales, resolutions, sizes, offsets, dense = [], [], [], [], []
    offset = 0
    for level in range(n_levels):
        scale = np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0)
        resolution = int(np.ceil(scale)) + 1
        dense_size = resolution**3
        size = min(-(-dense_size // 8) * 8, table_size)  # next multiple of 8 keeps accesses aligned in tcnn
        scales.append(float(scale))
        resolutions.append(resolution)
        sizes.append(size)
        offsets.append(offset)
        dense.append(dense_size <= size)
        offset += size
    return GridLayout(tuple(scales), tuple(resolutions), tuple(sizes), tuple(offsets), tuple(dense))
