"""The hold-out rules on their own: the paper's four, the automatic spread, none, given serials, bad requests."""

import numpy as np
import pytest

from pipeline.synthetic import SERIALS, rig_cameras
from stages.core.errors import PipelineError
from stages.depth.config import DepthConfig
from stages.geometry.holdout import (PAPER_HOLDOUT_CAMERAS, HoldoutSet, choose_holdout, spread_cameras,
                                     viewing_directions)
from stages.optimize.config import OptimizeConfig


def _rig(serials):
    return rig_cameras(80, 112, serials).world_2_cam


def test_the_paper_four_where_the_rig_has_them():
    held = choose_holdout(SERIALS, _rig(SERIALS), None, "depth")
    assert held.method == "paper" and set(held.cameras) == set(PAPER_HOLDOUT_CAMERAS)
    assert held.train(SERIALS) == [s for s in SERIALS if s not in PAPER_HOLDOUT_CAMERAS]
    assert choose_holdout(SERIALS, _rig(SERIALS), ["paper"], "depth") == held
    assert choose_holdout(SERIALS, None, ["auto"], "depth") == held  # needs no calibration


def test_auto_spreads_a_quarter_of_the_rig_over_its_viewing_directions():
    serials = [s for s in SERIALS if s != "221501007"]  # 15 cameras, one of the paper's four missing
    w2c = _rig(serials)
    held = choose_holdout(serials, w2c, None, "depth")
    assert held.method == "auto" and len(held.cameras) == 3 and "spread" in held.reason
    # deterministic, and the same whatever order the store lists its cameras in
    assert choose_holdout(serials, w2c, ["auto"], "depth") == held
    assert set(choose_holdout(list(reversed(serials)), w2c, None, "depth").cameras) == set(held.cameras)
    # spread: every pair of hold-outs is further apart than the rig's neighbouring cameras
    axes = viewing_directions(w2c, serials)
    angles = np.degrees(np.arccos(np.clip(axes @ axes.T, -1, 1)))
    neighbour = np.sort(angles, axis=1)[:, 1].max()
    chosen = [serials.index(s) for s in held.cameras]
    assert min(angles[a, b] for a in chosen for b in chosen if a < b) > 2 * neighbour
    # each hold-out lies between training cameras: some training camera on either side of it (azimuth)
    for index in chosen:
        others = [i for i in range(len(serials)) if i not in chosen]
        sides = np.sign(axes[others, 0] - axes[index, 0])
        assert (sides > 0).any() and (sides < 0).any()


def test_auto_holds_out_one_in_four_and_nothing_below_eight_cameras():
    for count, expected in ((8, 2), (12, 3), (7, 0), (3, 0)):
        serials = [s for s in SERIALS if s not in PAPER_HOLDOUT_CAMERAS][:count] if count <= 12 else SERIALS
        held = choose_holdout(serials, _rig(serials), None, "depth")
        assert len(held.cameras) == expected, (count, held)
        assert held.method == "auto"
    assert spread_cameras(_rig(SERIALS), SERIALS, 0) == []
    small = list(PAPER_HOLDOUT_CAMERAS) + [s for s in SERIALS if s not in PAPER_HOLDOUT_CAMERAS][:3]
    assert choose_holdout(small, None, None, "depth").cameras == ()  # 7 cameras, the paper's four among them
    assert set(choose_holdout(small, None, ["paper"], "depth").cameras) == set(PAPER_HOLDOUT_CAMERAS)


def test_none_trains_on_every_camera_and_given_serials_are_kept_in_store_order():
    assert choose_holdout(SERIALS, None, ["none"], "optimize") == HoldoutSet((), "none", choose_holdout(
        SERIALS, None, ["none"], "optimize").reason)
    given = choose_holdout(SERIALS, None, [SERIALS[5], SERIALS[1]], "optimize")
    assert given.cameras == (SERIALS[1], SERIALS[5]) and given.method == "given"


def test_bad_requests_name_the_culprit():
    small = SERIALS[:3]
    with pytest.raises(PipelineError, match="999.*not in this capture"):
        choose_holdout(small, None, ["999"], "depth")
    with pytest.raises(PipelineError, match="leaves 1 training camera.*at least 2"):
        choose_holdout(small, None, small[:2], "optimize")
    with pytest.raises(PipelineError, match="lacks the paper's hold-out camera"):
        choose_holdout(small, None, ["paper"], "depth")
    with pytest.raises(PipelineError, match="stands alone"):
        choose_holdout(small, None, ["none", small[0]], "depth")


def test_config_fields_take_keywords_lists_and_comma_separated_serials():
    assert DepthConfig(holdout="none").holdout == ["none"]
    assert DepthConfig(holdout="a, b").holdout == ["a", "b"] and DepthConfig().holdout is None
    assert DepthConfig(holdout=[]).holdout == ["none"]  # an empty list holds none out, as holdout_cameras=[] does
    assert OptimizeConfig(holdout=["a,b", "c"]).holdout_request() == ["a", "b", "c"]
    assert OptimizeConfig(holdout_cameras=["a"]).holdout_request() == ["a"]  # the older field still works
    assert OptimizeConfig(holdout_cameras=[]).holdout_request() == ["none"]
    assert OptimizeConfig().holdout_request() is None
    with pytest.raises(ValueError, match="disagree"):
        OptimizeConfig(holdout=["a"], holdout_cameras=["b"])
