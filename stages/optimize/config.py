"""The optimize stage's settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from stages.core.fields import Device, HoldoutRequest, LockTimeout, StageConfig, Threads, knob

# The four rig cameras the NeRSemble paper holds out for novel-view evaluation (defined with the hold-out rules).
from stages.geometry.holdout import PAPER_HOLDOUT_CAMERAS  # noqa: F401


class OptimizeConfig(StageConfig):
    """How the optimize stage trains NeRSemble. ``overrides`` reaches every model hyper-parameter by name."""

    preset: Literal["preview", "standard", "paper"] = Field(
        "preview", description="preview: minutes on a CPU; standard: one GPU, the official method on a 10x "
                               "shorter schedule (tens of minutes); paper: the official settings for a large GPU")
    steps: int | None = Field(None, ge=1, description="training steps; default: the preset's")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="model hyper-parameters by dotted path or unique name, e.g. "
                                          "{'hash.n_grids': 8, 'rays_per_batch': 2048}")
    holdout_cameras: list[str] | None = Field(
        None, description="serials kept out of training for evaluation (an empty list: none); kept for older "
                          "callers, --holdout says the same and more")
    holdout: HoldoutRequest = None  # hashed as the resolved set (in the input digest), never as the request
    use_depth: bool = Field(True, description="use the depth stage's maps in the depth losses when they exist")
    scene_box: tuple[tuple[float, float, float], tuple[float, float, float]] | None = Field(
        None, description="((xmin, ymin, zmin), (xmax, ymax, zmax)) in metres, calibration frame; default: the "
                          "mattes' visual hull, padded (or a box at the rig's focus when the hull is empty)")
    device: Device = "auto"
    encoding: Literal["auto", "torch", "tcnn", "triton"] = knob(
        "auto", description="hash-grid backend: auto = tcnn when importable, else triton on CUDA, else the "
                            "pure-torch one")
    time_budget_s: float | None = knob(
        None, gt=0, description="stop training after this many seconds (a checkpoint is written); steps "
                                "schedules keep their meaning")
    checkpoint_every: int | None = knob(None, ge=1, description="steps between checkpoints; default: the preset's")
    checkpoint_every_s: float | None = knob(
        300.0, gt=0, description="also checkpoint after this many seconds of wall time (an interrupt or a crash "
                                 "loses at most this much training)")
    resume: bool = knob(True, description="continue from the last checkpoint of the same config")
    threads: Threads = 0
    seed: int | None = Field(None, description="random seed; default: the preset's")
    lock_timeout: LockTimeout = 0.0

    @field_validator("scene_box")
    @classmethod
    def _box_has_volume(cls, box: tuple | None) -> tuple | None:
        if box is not None and not all(hi > lo for lo, hi in zip(box[0], box[1])):
            raise ValueError(f"scene_box {box}: every max must exceed its min")
        return box

    @field_validator("holdout_cameras")
    @classmethod
    def _holdout_serials_are_strings(cls, cameras: list[str] | None) -> list[str] | None:
        return [str(c) for c in cameras] if cameras is not None else None

    @field_validator("holdout")
    @classmethod
    def _one_holdout(cls, holdout: list[str] | None, info: ValidationInfo) -> list[str] | None:
        """Both requests given (holdout_cameras is declared first, so it is checked already) must agree."""
        cameras = info.data.get("holdout_cameras")
        if holdout is not None and cameras is not None and set(cameras or ["none"]) != set(holdout):
            raise ValueError(f"holdout {holdout} and holdout_cameras {cameras} disagree; give one")
        return holdout

    def holdout_request(self) -> list[str] | None:
        """``holdout``, else ``holdout_cameras`` (an empty list there meaning none), else None: the recorded set."""
        if self.holdout is not None:
            return self.holdout
        if self.holdout_cameras is not None:
            return self.holdout_cameras or ["none"]
        return None
