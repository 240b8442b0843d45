"""The optimize stage's settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator


# The four rig cameras the NeRSemble paper holds out for novel-view evaluation.
PAPER_HOLDOUT_CAMERAS = ("222200040", "220700191", "222200043", "221501007")


class OptimizeConfig(BaseModel):
    """How the optimize stage trains NeRSemble. ``overrides`` reaches every model hyper-parameter by name."""

    preset: Literal["preview", "paper"] = Field(
        "preview", description="preview: minutes on a CPU; paper: the official settings for a large GPU")
    steps: int | None = Field(None, ge=1, description="training steps; default: the preset's")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="model hyper-parameters by dotted path or unique name, e.g. "
                                          "{'hash.n_grids': 8, 'rays_per_batch': 2048}")
    holdout_cameras: list[str] | None = Field(
        None, description="serials kept out of training for evaluation; default: the paper's four, where present")
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
    checkpoint_every_s: float | None = Field(
        300.0, gt=0, description="also checkpoint after this many seconds of wall time (an interrupt or a crash "
                                 "loses at most this much training)")
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

    def result_fields(self) -> dict:
        """The fields that decide the trained model (execution knobs excluded), for the config hash."""
        return self.model_dump(exclude={"device", "encoding", "time_budget_s", "checkpoint_every", "checkpoint_every_s", "resume",
                                        "threads", "lock_timeout"})
