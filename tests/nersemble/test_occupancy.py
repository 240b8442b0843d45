"""Occupancy grid: EMA-with-max updates, warm-up probing, thresholds and the training-frustum mask."""

from __future__ import annotations

import numpy as np
import torch

from stages.core.cameras import look_at
from stages.nersemble.config import OccupancyConfig, preset
from stages.nersemble.occupancy import OccupancyGrid, frustum_visibility_mask
from stages.nersemble.occupancy_filter import filter_occupancy, gaussian_blur3d, largest_component

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
R = 16


def _cell_corners_inside(radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell: all 8 corners inside the sphere / all outside (cells cut by the surface are neither)."""
    edges = torch.linspace(-1.0, 1.0, R + 1)
    lo, hi = edges[:-1], edges[1:]
    nearest = torch.where(lo > 0, lo, torch.where(hi < 0, hi, torch.zeros_like(lo)))  # closest coordinate to 0
    farthest = torch.maximum(lo.abs(), hi.abs())
    near2 = nearest[:, None, None] ** 2 + nearest[None, :, None] ** 2 + nearest[None, None, :] ** 2
    far2 = farthest[:, None, None] ** 2 + farthest[None, :, None] ** 2 + farthest[None, None, :] ** 2
    return far2 < radius**2, near2 > radius**2


def test_update_marks_a_known_occupied_region():
    grid = OccupancyGrid(BOX, OccupancyConfig(resolution=R))
    radius = 0.5

    def occ(points):  # density * step: 1 inside a ball, 0 elsewhere
        return (points.norm(dim=-1) < radius).float()

    assert grid.update(0, occ)
    inside, outside = _cell_corners_inside(radius)
    assert grid.binary[inside].all() and not grid.binary[outside].any()
    probes = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.9, 0.9], [3.0, 0.0, 0.0]])
    assert grid.lookup(probes).tolist() == [True, False, False]


def test_ema_keeps_the_max_and_decays():
    grid = OccupancyGrid(BOX, OccupancyConfig(resolution=R))
    grid.update(0, lambda p: torch.ones(p.shape[0]))
    assert torch.all(grid.occs == 1.0)
    assert not grid.update(5, lambda p: torch.zeros(p.shape[0]))  # not an update step
    grid.update(16, lambda p: torch.zeros(p.shape[0]))  # still warm-up: every cell probed
    torch.testing.assert_close(grid.occs, torch.full((R**3,), 0.95))
    grid.update(32, lambda p: torch.full((p.shape[0],), 2.0))
    assert torch.all(grid.occs == 2.0)


def test_threshold_is_min_of_mean_and_occ_threshold():
    grid = OccupancyGrid(BOX, OccupancyConfig(resolution=R))
    # Everything dense (all >= 0.01): the threshold is 0.01, so every cell with > 0.01 stays on.
    grid.update(0, lambda p: torch.where(p[:, 0] > 0, 1.0, 0.02))
    assert grid.binary.all()
    # Everything nearly empty: the mean decides, and the denser half stays on.
    grid = OccupancyGrid(BOX, OccupancyConfig(resolution=R))
    grid.update(0, lambda p: torch.where(p[:, 0] > 0, 0.004, 0.001))
    assert grid.binary[R // 2:].all() and not grid.binary[: R // 2].any()


def test_probing_after_warm_up():
    grid = OccupancyGrid(BOX, OccupancyConfig(resolution=R, warmup_steps=256))
    assert grid.cells_to_probe(0).numel() == R**3
    grid.binary.zero_()
    grid.binary[0, 0, :5] = True
    probed = grid.cells_to_probe(256)
    assert probed.numel() == R**3 // 4 + 5 and set(range(5)) <= set(probed[-5:].tolist())


def test_points_are_jittered_inside_their_cells():
    grid = OccupancyGrid(BOX, OccupancyConfig(resolution=R))
    ids = torch.arange(R**3)
    points = grid.cell_points(ids)
    ijk = ((points - BOX[0]) / 2.0 * R).floor().long()
    assert torch.equal((ijk[:, 0] * R + ijk[:, 1]) * R + ijk[:, 2], ids)


def test_frustum_mask_needs_two_cameras():
    # Two narrow cameras (half-angle tan = 0.05) ten units away along z and along x: each sees a ~1-wide tube
    # through the box; only around the centre do the tubes cross.
    K = np.array([[1000.0, 0, 50], [0, 1000.0, 50], [0, 0, 1]])
    along_z = look_at(np.array([0.0, 0.0, -10.0]), np.zeros(3))
    along_x = look_at(np.array([-10.0, 0.0, 0.0]), np.zeros(3))
    away = look_at(np.array([0.0, 0.0, -10.0]), np.array([0.0, 0.0, -20.0]))
    cams = dict(intrinsics=[K, K, K], world_2_cams=[along_z, along_x, away], sizes=[(100, 100)] * 3)
    two = frustum_visibility_mask(BOX, R, min_cameras=2, **cams)
    one = frustum_visibility_mask(BOX, R, min_cameras=1, **cams)
    lattice = torch.linspace(-1.0, 1.0, R)  # upstream tests grid end points, not cell centres
    centre, z_end = int(torch.argmin(lattice.abs())), R - 2  # z_end: lattice coordinate 0.87
    assert two[centre, centre, centre] and one[centre, centre, centre]
    assert one[centre, centre, z_end] and not two[centre, centre, z_end]  # only the camera along z sees it
    assert not one[0, 0, 0] and not two.all()
    assert (two <= one).all() and 0 < int(two.sum()) < int(one.sum())
    # The camera looking away from the box contributes nothing (points behind a camera fail the side planes).
    assert not frustum_visibility_mask(BOX, R, [K], [away], [(100, 100)], min_cameras=1).any()
    centers = frustum_visibility_mask(BOX, R, min_cameras=2, points="centers", **cams)
    assert centers[centre, centre, centre] and not centers[0, 0, 0]


def test_evaluation_filter_keeps_the_largest_blob_and_a_margin():
    mask = torch.zeros(32, 32, 32, dtype=torch.bool)
    mask[4:12, 4:12, 4:12] = True  # the head
    mask[20:22, 20:22, 20:22] = True  # a floater, not touching it
    mask[12, 4, 4] = True  # touches the head face-on: same 6-connected component
    component = largest_component(mask)
    assert int(component.sum()) == 8**3 + 1 and not bool(component[21, 21, 21])

    occs = torch.where(mask, 5.0, 0.0)
    keep = filter_occupancy(occs, threshold=0.05, sigma_thinning=1.0, sigma_erosion=2.0)
    assert bool(keep[4:12, 4:12, 4:12].all()) and bool(keep[13, 8, 8])  # the head and a margin around it
    assert not bool(keep[21, 21, 21]) and not bool(keep[30, 30, 30])
    torch.testing.assert_close(gaussian_blur3d(torch.ones(9, 9, 9), 1.5), torch.ones(9, 9, 9))


def test_evaluation_filter_leaves_an_undertrained_grid_alone():
    """Scattered specks (a model trained for a few steps) have no subject blob to keep: nothing is removed."""
    specks = torch.zeros(32, 32, 32)
    specks[::4, ::4, ::4] = 5.0  # 512 one-cell components
    specks[0:2, 0, 0] = 5.0  # the largest: 2 cells
    assert bool(filter_occupancy(specks, threshold=0.05, sigma_thinning=0.25, sigma_erosion=1.75).all())
    blob = torch.zeros(32, 32, 32)
    blob[10:12, 10:12, 10] = 5.0  # a lone 4-cell blob: its blur of sigma 7 is < 1 everywhere
    keep = filter_occupancy(blob, threshold=0.05, sigma_thinning=0.25, sigma_erosion=7.0)
    assert bool(keep[10:12, 10:12, 10].all()) and not bool(keep[30, 30, 30])


def test_evaluation_filter_never_removes_most_of_what_renders():
    """A young model's grid is a fog of about the candidate level (the evaluate test's model after 60 steps: occs
    0.07-0.12, u8 ~12 against a cut of 12.75). One probe on a denser point lifted one cell over the cut; that cell
    was all of the candidates, the filter kept it alone and the hold-out render came out white. Floaters are a
    small share of what a grid holds: a filter that would remove most of its opacity leaves it as it is."""
    e, r = preset("preview").eval, preset("preview").occupancy.resolution
    fog = torch.full((r, r, r), 0.095)
    fog[16, 16, 16] = 0.126
    assert bool(filter_occupancy(fog, e.filter_threshold, e.filter_sigma_thinning, e.filter_sigma_erosion).all())
    # Only the cells renders march through count: fog outside them (e.g. outside the matte hull) does not stop
    # the filter from removing a floater beside a dense subject.
    occupied = torch.zeros(r, r, r, dtype=torch.bool)
    occupied[4:28, 4:28, 4:30] = True
    occs = torch.full((r, r, r), 0.095)
    occs[8:20, 8:20, 8:20] = 5.0  # the head
    occs[13:15, 13:15, 26:28] = 5.0  # a floater 6 cells beside it
    keep = filter_occupancy(occs, e.filter_threshold, e.filter_sigma_thinning, e.filter_sigma_erosion,
                            occupied=occupied)
    assert bool(keep[8:20, 8:20, 8:20].all()) and not bool(keep[14, 14, 27])


def test_preview_filter_removes_a_floater_on_its_coarse_grid():
    """The preview's filter sigmas are scaled to its grid: upstream's 7 cells would keep all of a 32^3 grid."""
    e, r = preset("preview").eval, preset("preview").occupancy.resolution
    occs = torch.zeros(r, r, r)
    occs[8:20, 8:20, 8:20] = 5.0  # the head
    occs[13:15, 13:15, 26:28] = 5.0  # a floater 6 cells beside it
    keep = filter_occupancy(occs, e.filter_threshold, e.filter_sigma_thinning, e.filter_sigma_erosion)
    assert bool(keep[8:20, 8:20, 8:20].all()) and bool(keep[20, 14, 14])  # the head and a margin
    assert not bool(keep[14, 14, 27]) and not bool(keep[0, 0, 0])
    upstream = preset("paper").eval
    assert bool(filter_occupancy(occs, upstream.filter_threshold, upstream.filter_sigma_thinning,
                                 upstream.filter_sigma_erosion)[14, 14, 27])
