"""The evaluation-time occupancy filter: keep the largest connected blob of the grid (and a margin around it).

Upstream runs it once before its evaluation renders (``util/connected_components.py``): floaters that the
training cameras never saw are disconnected from the head, so dropping every component but the largest
removes them from hold-out views. Plain torch, so it runs where the model runs:

1. ``u8 = uint8((sigmoid(occs) - 0.5) * 2 * 255)`` (truncated), blurred with a Gaussian of ``sigma_thinning``;
2. cells with ``u8 >= 255 * threshold`` are candidates; the largest 6-connected component is kept;
3. it is grown by a Gaussian blur (``sigma_erosion``) of ``component * 100``: cells whose integer value is > 0.

Not upstream: a grid with no candidate, or whose largest component holds under half of the candidates (the
scattered noise of a model trained for a few steps), is left as it is rather than emptied; the component
itself is always kept, even where the blur of a small one floors to 0. And a grid where the cells the filter
would switch off hold more of the occupied cells' opacity than the cells it keeps is left as it is: floaters
are a small share of what a grid holds, so a filter about to remove most of it has found a speck, not the
subject. That happens to a young model whose field is still a fog of about the candidate level (density x
step ~0.1 is u8 ~12 against a cut of 12.75): one probe that lands on a denser point lifts one cell over the
cut, that cell is the whole of the candidates, and without this guard it would be all that is left to render.
"""

from __future__ import annotations

import numpy as np
import torch

TRUNCATE = 4.0  # kernel radius in sigmas (scipy's default, which upstream's filter uses)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """scipy.ndimage's 1-d Gaussian (radius ``int(4 sigma + 0.5)``, normalised), in float64 as scipy builds it."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return weights / weights.sum()


def reflect_indices(size: int, radius: int) -> torch.Tensor:
    """Indices of a line of ``size`` cells padded by ``radius`` in scipy's 'reflect' mode.

    Half-sample symmetric: the edge cell repeats (d c b a | a b c d | d c b a), and a pad longer than the line
    keeps reflecting (period ``2 size``). torch's own 'reflect' padding is scipy's 'mirror' (no repeat).
    """
    index = torch.arange(-radius, size + radius) % (2 * size)
    return torch.where(index < size, index, 2 * size - 1 - index)


def gaussian_blur3d(volume: torch.Tensor, sigma: float, integer: bool = False) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter(volume, sigma)`` (mode 'reflect', truncate 4) of an (R, R, R) volume.

    Axis by axis as scipy does, in float64 with scipy's summation order (the centre tap, then each pair of
    symmetric taps from the outermost in), so the result matches scipy to the last bit in the cases upstream
    uses. ``integer``: the volume holds an integer array, as upstream's does (uint8 or int64), so scipy
    stores every axis's result back into that integer type, truncating toward zero; mimicked here, pass by
    pass. Otherwise each pass is stored in the volume's dtype, as scipy stores it in the input's.
    """
    weights = gaussian_kernel(sigma)
    radius = (len(weights) - 1) // 2
    out = volume.to(torch.float64)
    if radius == 0:
        return volume.clone()
    taps = [float(w) for w in weights[radius:]]  # taps[j]: the weight j cells from the centre
    for axis in range(3):
        size = out.shape[axis]
        padded = out.index_select(axis, reflect_indices(size, radius).to(out.device))

        def shifted(offset: int) -> torch.Tensor:
            return padded.narrow(axis, radius + offset, size)

        acc = shifted(0) * taps[0]
        for j in range(radius, 0, -1):
            acc = acc + (shifted(-j) + shifted(j)) * taps[j]
        out = torch.trunc(acc) if integer else acc.to(volume.dtype).to(torch.float64)
    return out.to(volume.dtype)


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 6-connected component of a boolean (R, R, R) mask (empty mask -> empty)."""
    if not bool(mask.any()):
        return mask.clone()
    labels = torch.where(mask, torch.arange(1, mask.numel() + 1, device=mask.device).view(mask.shape), 0)
    neighbours = [(shift, axis, _not_wrapped(labels, shift, axis)) for axis in range(3) for shift in (1, -1)]
    while True:  # propagate the largest label through 6-neighbours until nothing changes
        grown = labels.clone()
        for shift, axis, inside in neighbours:
            grown = torch.maximum(grown, torch.roll(labels, shift, axis) * inside)
        grown = torch.where(mask, grown, 0)
        if torch.equal(grown, labels):
            break
        labels = grown
    values, counts = torch.unique(labels[mask], return_counts=True)
    return labels == values[torch.argmax(counts)]


def _not_wrapped(labels: torch.Tensor, shift: int, axis: int) -> torch.Tensor:
    """1 where ``torch.roll`` brought a true neighbour, 0 where it wrapped around the border."""
    keep = torch.ones_like(labels)
    index = [slice(None)] * 3
    index[axis] = 0 if shift == 1 else labels.shape[axis] - 1
    keep[tuple(index)] = 0
    return keep


def filter_occupancy(occs: torch.Tensor, threshold: float = 0.05, sigma_thinning: float = 1.0,
                     sigma_erosion: float = 7.0, occupied: torch.Tensor | None = None) -> torch.Tensor:
    """The mask ([R, R, R] bool) of cells to keep, from the grid's EMA values ``occs`` ([R, R, R]).

    ``occupied`` ([R, R, R] bool, None: every cell) are the cells renders march through; the guard against
    removing most of the grid weighs their opacity only.
    """
    u8 = torch.floor((torch.sigmoid(occs.float()) - 0.5) * 2 * 255).clamp(0, 255)
    thinned = gaussian_blur3d(u8, sigma_thinning, integer=True)  # upstream blurs the uint8 array itself
    candidates = thinned >= 255 * threshold
    if not bool(candidates.any()):  # nothing dense enough yet (a barely trained model): filter nothing
        return torch.ones_like(candidates)
    component = largest_component(candidates)
    # The filter assumes one subject blob among smaller floaters. Scattered noise with no dominant blob (an
    # undertrained model) is left alone: keeping its largest speck would erase the subject.
    if 2 * int(component.sum()) < int(candidates.sum()):
        return torch.ones_like(candidates)
    grown = gaussian_blur3d(component.float() * 100, sigma_erosion, integer=True)  # an integer array upstream too
    keep = (grown > 0) | component  # a small blob's blur can floor to 0 everywhere; never drop the blob
    # occs is density x step: 1 - exp(-occs) is the opacity of one marching step there, at most 1 a cell.
    opacity = -torch.expm1(-occs.float().clamp(min=0.0))
    if occupied is not None:
        opacity = opacity * occupied.to(opacity.device, opacity.dtype)
    if float(opacity[~keep].sum()) > float(opacity[keep].sum()):  # it would remove most of what renders
        return torch.ones_like(candidates)
    return keep


__all__ = ["filter_occupancy", "gaussian_blur3d", "largest_component"]
