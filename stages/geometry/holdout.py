"""The sequence's hold-out cameras: chosen once, recorded in the capture store, honoured by every stage.

Hold-out cameras are only rendered and scored. Nothing that training uses may depend on their frames or
mattes: not the depth maps (they are neither reference views nor stereo sources), not a visual hull, not the
scene box, not the occupancy mask. So the set is decided once per sequence and written to the store's attrs
(attr ``holdout``: cameras, how they were chosen, why); depth, optimize, export and evaluate all read that record.

Requests (``--holdout`` on depth and optimize; the field type is ``stages.core.fields.HoldoutRequest``):

- ``None`` (not given): the set the sequence already recorded, else ``auto``;
- ``auto``: below 8 cameras nothing (each camera is too valuable to training); else the paper's four
  (:data:`PAPER_HOLDOUT_CAMERAS`) when the rig has all of them; else a quarter of the rig (at most 4) spread
  over its viewing directions (:func:`spread_cameras`);
- ``paper``: the paper's four, which must all be present;
- ``none`` (or an empty list): every camera trains (production use; evaluate then reports that nothing is held
  out);
- serials: exactly these cameras.

Changing the set re-runs depth and optimize: both fold the resolved cameras into their input digest
(:func:`digest_part`), export and evaluate the recorded ones. A store never mixes two protocols: optimize
refuses depth maps made with another set (:func:`check_depth_protocol`), and export/evaluate refuse a model
trained with another set (:func:`check_model_protocol`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.core.errors import PipelineError, StageOrderError

PAPER_HOLDOUT_CAMERAS = ("222200040", "220700191", "222200043", "221501007")  # EVALUATION_CAM_IDS 3, 6, 11, 15
KEYWORDS = ("auto", "paper", "none")
AUTO_MIN_CAMERAS = 8  # below this every camera trains: the paper holds out 4 of 16, leaving 12
AUTO_MAX_HOLDOUT = 4  # the paper's count
AUTO_SHARE = 4  # auto holds out one camera in four (the paper's 4 of 16)
MIN_TRAIN_CAMERAS = 2  # the least a multi-view model (and a visual hull) can train on


@dataclass(frozen=True)
class HoldoutSet:
    """The hold-out serials (store order), how they were chosen and why."""

    cameras: tuple[str, ...]
    method: str  # "paper" | "auto" | "given" | "none"
    reason: str

    def train(self, serials: Iterable[str]) -> list[str]:
        """The training cameras: every other serial, in the given order."""
        return [s for s in serials if s not in self.cameras]

    def to_json(self) -> dict[str, Any]:
        return {"cameras": list(self.cameras), "method": self.method, "reason": self.reason}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HoldoutSet:
        return cls(cameras=tuple(str(s) for s in data.get("cameras", [])), method=str(data.get("method", "given")),
                   reason=str(data.get("reason", "")))


def viewing_directions(world_2_cam: Mapping[str, np.ndarray], serials: Sequence[str]) -> np.ndarray:
    """(C, 3) unit optical axes (camera +z) in world coordinates."""
    axes = np.stack([np.asarray(world_2_cam[s], dtype=np.float64)[2, :3] for s in serials])
    return axes / np.linalg.norm(axes, axis=1, keepdims=True)


def spread_cameras(world_2_cam: Mapping[str, np.ndarray], serials: Sequence[str], count: int) -> list[str]:
    """``count`` cameras spread over the rig's viewing directions, each in the middle of its own group.

    k-medoids on the angles between unit viewing directions, seeded by farthest-point sampling from the camera
    nearest the mean direction. A medoid is surrounded by the cameras of its group, so each hold-out view lies
    between training views (scores measure interpolation, as the paper's do, not extrapolation past the rig's
    edge). Deterministic and independent of camera order: cameras are visited by serial, ties go to the
    smaller serial.
    """
    order = sorted(serials)
    if count <= 0:
        return []
    axes = viewing_directions(world_2_cam, order)
    angle = np.arccos(np.clip(axes @ axes.T, -1.0, 1.0))
    mean = axes.mean(0)
    first = int(np.argmax(axes @ (mean / max(np.linalg.norm(mean), 1e-12))))
    medoids = [first]
    while len(medoids) < count:
        gap = angle[:, medoids].min(1)
        gap[medoids] = -1.0
        medoids.append(int(np.argmax(gap)))
    for _ in range(100):  # alternate assignment and medoid update until nothing moves
        groups = np.argmin(angle[:, medoids], axis=1)
        moved = []
        for g, medoid in enumerate(medoids):
            members = np.flatnonzero(groups == g)
            cost = angle[np.ix_(members, members)].sum(1)
            moved.append(int(members[np.argmin(cost)]) if members.size else medoid)
        if moved == medoids:
            break
        medoids = moved
    chosen = {order[i] for i in medoids}
    return [s for s in serials if s in chosen]


def choose_holdout(serials: Sequence[str], world_2_cam: Mapping[str, np.ndarray] | None, request: Sequence[str] | None,
                   stage: str) -> HoldoutSet:
    """What ``request`` means on a rig of ``serials``; a bad request is a PipelineError naming the culprit."""
    serials = [str(s) for s in serials]
    words = [w.lower() for w in request] if request else ["auto"]
    if len(words) == 1 and words[0] in KEYWORDS:
        held = _keyword(words[0], serials, world_2_cam, stage)
    else:
        misplaced = [w for w in words if w in KEYWORDS]
        if misplaced:
            raise PipelineError(f"{stage} --holdout: {misplaced[0]!r} stands alone; name either a keyword "
                                f"({', '.join(KEYWORDS)}) or camera serials, not both")
        unknown = [s for s in request if s not in serials]
        if unknown:
            raise PipelineError(f"{stage} --holdout: camera(s) {', '.join(unknown)} are not in this capture "
                                f"(it has {', '.join(serials)})")
        held = HoldoutSet(tuple(s for s in serials if s in request), "given", "named by the user")
    train = held.train(serials)
    if len(train) < MIN_TRAIN_CAMERAS:
        raise PipelineError(f"{stage} --holdout: holding out {', '.join(held.cameras)} leaves {len(train)} training "
                            f"camera(s); {stage} needs at least {MIN_TRAIN_CAMERAS}")
    return held


def _keyword(word: str, serials: list[str], world_2_cam: Mapping[str, np.ndarray] | None, stage: str) -> HoldoutSet:
    paper_present = all(s in serials for s in PAPER_HOLDOUT_CAMERAS)
    if word == "none":
        return HoldoutSet((), "none", "asked for none: every camera trains")
    if word == "auto" and len(serials) < AUTO_MIN_CAMERAS:
        return HoldoutSet((), "auto", f"{len(serials)} cameras (fewer than {AUTO_MIN_CAMERAS}): every camera trains")
    if word == "paper" or paper_present:
        if not paper_present:
            missing = [s for s in PAPER_HOLDOUT_CAMERAS if s not in serials]
            raise PipelineError(f"{stage} --holdout paper: this capture lacks the paper's hold-out camera(s) "
                                f"{', '.join(missing)}; use auto or name the cameras")
        return HoldoutSet(tuple(s for s in serials if s in PAPER_HOLDOUT_CAMERAS), "paper",
                          "the NeRSemble paper's four evaluation cameras")
    if world_2_cam is None:
        raise StageOrderError(f"{stage}: choosing hold-out cameras needs the calibration; run calibrate first")
    count = min(AUTO_MAX_HOLDOUT, len(serials) // AUTO_SHARE)
    return HoldoutSet(tuple(spread_cameras(world_2_cam, serials, count)), "auto",
                      f"{count} of {len(serials)} cameras spread over the rig's viewing directions (k-medoids)")


# --- the store's record ---------------------------------------------------------------------------------------


def recorded_holdout(store: Any) -> HoldoutSet | None:
    """The set the store recorded, or None (never chosen yet)."""
    data = store.holdout
    return None if data is None else HoldoutSet.from_json(data)


def resolve_holdout(store: Any, request: Sequence[str] | None, stage: str) -> HoldoutSet:
    """The set a stage works with: the recorded one when nothing is asked, else what the request means.

    Pure: it writes nothing (see :func:`record_holdout`), so a bad request fails before any output changes.
    """
    recorded = recorded_holdout(store)
    if request is None and recorded is not None and all(s in store.cameras for s in recorded.cameras):
        return recorded
    return choose_holdout(store.cameras, store.world_2_cam, request, stage)


def record_holdout(store: Any, holdout: HoldoutSet) -> None:
    """Write the set to the store, unless it already records these cameras (the first choice's note stays)."""
    recorded = recorded_holdout(store)
    if recorded is None or set(recorded.cameras) != set(holdout.cameras):
        store.set_holdout(holdout.to_json())


def depth_holdout(depth_report: Mapping[str, Any]) -> list[str] | None:
    """The hold-out cameras the depth maps were made without, from the depth report (None: before hold-outs)."""
    data = depth_report.get("holdout")
    return None if not isinstance(data, Mapping) else [str(s) for s in data.get("cameras", [])]


def check_depth_protocol(store: Any, holdout: HoldoutSet, stage: str, depth_command: str) -> None:
    """Refuse depth maps made with another hold-out set: training on them would mix two protocols."""
    record = store.stage_record("depth")
    if record is None:
        return
    made_without = depth_holdout(record.report or {})
    if set(made_without or []) == set(holdout.cameras):  # depth from before hold-outs used every camera: none
        return
    wanted = ", ".join(holdout.cameras) or "none"
    if made_without is None:
        made = "before hold-out cameras were kept out of depth (every camera fed them)"
    else:
        made = f"holding out {', '.join(made_without) or 'none'}"
    raise PipelineError(f"{store.uri}: the depth maps were made {made}, but {stage} holds out {wanted}; re-run "
                        f"`{depth_command} --holdout {','.join(holdout.cameras) or 'none'}` first (it re-runs "
                        f"everything after it), or run {stage} without --holdout to keep the sequence's set")


def check_model_protocol(store: Any, model_holdout: Sequence[str], stage: str, optimize_command: str) -> None:
    """Refuse a model trained with another hold-out set than the one the sequence records now."""
    recorded = recorded_holdout(store)
    if recorded is None or set(recorded.cameras) == set(model_holdout):
        return
    raise StageOrderError(f"{store.uri}: the model was trained holding out {', '.join(model_holdout) or 'none'}, "
                          f"but the sequence now holds out {', '.join(recorded.cameras) or 'none'} "
                          f"({recorded.method}); run `{optimize_command}` again")


def recorded_cameras(store: Any) -> list[str] | None:
    """The recorded hold-out serials, sorted (for digests), or None when no set was recorded."""
    recorded = recorded_holdout(store)
    return None if recorded is None else sorted(recorded.cameras)


def digest_part(cameras: Iterable[str] | None) -> dict[str, list[str]] | None:
    """What a stage folds into its input digest for a hold-out set: the sorted serials, or None when nothing is
    held out, so a record written before hold-outs existed (every camera fed it) still matches where that is
    still true, and any other set re-runs the stage."""
    held = sorted(cameras or [])
    return {"holdout": held} if held else None
