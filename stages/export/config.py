"""The export stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from stages.core.fields import Device, LockTimeout, RayChunk, RenderSubsteps, StageConfig, Threads


class ExportConfig(StageConfig):
    """What the export stage renders from the trained model, and how it encodes it."""

    turntable: bool = Field(True, description="render the turntable video (export/turntable.mp4)")
    holdout: bool = Field(True, description="render every hold-out camera for every frame (export/holdout/)")
    path: str | None = Field(None, description="camera path JSON to render: width, height, keyframes of "
                                               "{K, world_2_cam, time[, frame]} (export/path.mp4)")
    path_cameras: list[str] | None = Field(
        None, description="render a smooth path through these rig cameras, in this order (export/rig_path.mp4)")
    benchmark: bool = Field(False, description="write the NeRSemble benchmark NVS submission layout")
    benchmark_size: tuple[int, int] = Field(
        (1100, 1604), description="(width, height) of the benchmark videos (the NVS task's 1100x1604)")
    benchmark_fps: float = Field(73.0, gt=0, description="frame rate of the benchmark videos (the writer's 73)")
    seconds: float = Field(4.0, gt=0, description="turntable length")
    fps: float = Field(24.0, gt=0, description="frames per second of every video")
    resolution_scale: float = Field(1.0, gt=0, description="render size relative to the stored frames")
    elevation_deg: float = Field(0.0, description="turntable camera height above the rig's mean, in degrees")
    radius_m: float | None = Field(None, gt=0, description="turntable orbit distance; default: the rig's mean")
    trajectory: Literal["orbit", "official"] = Field(
        "orbit", description="orbit: around the rig's up axis; official: upstream's circle around the frontal axis")
    arc_deg: float = Field(360.0, gt=0, le=360, description="orbit: azimuth range; below 360 it sways across "
                                                            "the front instead of showing the unseen back")
    background: Literal["white", "transparent"] = Field(
        "white", description="transparent also writes RGBA PNG frames and an alpha video")
    crf: int = Field(14, ge=0, le=51, description="H.264 constant rate factor (14: the benchmark's)")
    depth_videos: bool = Field(False, description="also write depth and alpha videos beside each render")
    eval_substeps: RenderSubsteps = None
    device: Device = "auto"
    chunk: RayChunk = 8192
    threads: Threads = 0
    lock_timeout: LockTimeout = 0.0

    @field_validator("path_cameras")
    @classmethod
    def _path_serials_are_strings(cls, cameras: list[str] | None) -> list[str] | None:
        return [str(c) for c in cameras] if cameras else None
