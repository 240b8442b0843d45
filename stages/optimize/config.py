"""The optimize stage's settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

# The four rig cameras the NeRSemble paper holds out for novel-view evaluation (defined with the hold-out rules).
from stages.geometry.holdout import HOLDOUT_HELP, PAPER_HOLDOUT_CAMERAS, HoldoutRequest  # noqa: F401


class OptimizeConfig(BaseModel):
    """How the optimize stage trains NeRSemble. ``overrides`` reaches every model hyper-parameter by name."""

    preset: Literal["preview", "paper"] = Field(
        "preview", description="preview: minutes on a CPU; paper: the official settings for a large GPU")
    steps: int | None = Field(None, ge=1, description="training steps; default: the preset's")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="model hyper-parameters by dotted path or unique name, e.g. "
                                          "{'hash.n_grids': 8, 'rays_per_batch': 2048}")
    holdout_cameras: list[str] | None = Field(
        None, description="serials kept out of training for evaluation (an empty list: none); kept for older "
                          "callers, --holdout says the same and more")
    holdout: HoldoutRequest = Field(None, description=HOLDOUT_HELP)  # hashed as the resolved set, not the request
    use_depth: bool = Field(True, description="use the depth stage's maps in the depth losses when they exist")
    scene_box: tuple[tuple[float, float, float], tuple[float, float, float]] | None = Field(
        None, description="((xmin, ymin, zmin), (xmax, ymax, zmax)) in metres, calibration frame; default: the "
                          "mattes' visual hull, padded (or a box at the rig's focus when the hull is empty)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if torch sees a GPU")
    encoding: Literal["auto", "torch", "tcnn"] = Field(
        "auto", description="hash-grid backend: tcnn when importable (auto), or the pure-torch one")
    time_budget_s: float | None = Field(
        None, gt=0, description="stop training after this many seconds (a checkpoint is written); steps "
                                "schedules keep their meaning")
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints; default: the preset's")
    resume: bool = Field(True, description="continue from the last checkpoint of the same config")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    seed: int | None = Field(None, description="random seed; default: the preset's")
    lock_timeout: float = Field(0.0, ge=0.0, description="seconds to wait for another writer of the sequence")

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

    @model_validator(mode="after")
    def _one_holdout(self) -> OptimizeConfig:
        if self.holdout is not None and self.holdout_cameras is not None \
                and set(self.holdout_cameras) != set(self.holdout):
            raise ValueError(f"holdout {self.holdout} and holdout_cameras {self.holdout_cameras} disagree; give one")
        return self

    def holdout_request(self) -> list[str] | None:
        """``holdout``, else ``holdout_cameras`` (an empty list there meaning none), else None: the recorded set."""
        if self.holdout is not None:
            return self.holdout
        if self.holdout_cameras is not None:
            return self.holdout_cameras or ["none"]
        return None

    def result_fields(self) -> dict:
        """The fields that decide the trained model (execution knobs excluded), for the config hash."""
        return self.model_dump(exclude={"device", "encoding", "time_budget_s", "checkpoint_every", "resume",
                                        "threads", "lock_timeout"})
