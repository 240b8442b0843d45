"""The depth stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from stages.core.fields import Device, HoldoutRequest, LockTimeout, PreviewCameras, StageConfig, Workers, knob


class DepthConfig(StageConfig):
    """How the depth stage fills the store's depth maps. Execution knobs and previews stay out of the config hash."""

    method: Literal["auto", "sweep", "colmap"] = Field(
        "auto", description="sweep: multi-view plane-sweep stereo in torch; colmap: COLMAP PatchMatch stereo "
                            "(needs a CUDA build of pycolmap); auto: colmap where pycolmap has CUDA, else sweep")
    device: Device = Field("auto", description="where the sweep runs; auto: CUDA if torch sees a GPU, else CPU")
    neighbours: int = Field(3, ge=1, description="source cameras per reference view, nearest by viewing direction")
    max_neighbour_angle: float = Field(60.0, gt=0, le=180, description="degrees between viewing directions "
                                                                         "beyond which a camera is no neighbour")
    best_k: int = Field(2, ge=1, description="sources whose scores are averaged per hypothesis (the best ones), "
                                             "so a source that is occluded there drops out")
    window: int = Field(7, ge=3, description="NCC window side in pixels (odd)")
    min_ncc: float = Field(0.3, ge=-1, le=1, description="aggregated NCC below which a pixel has no answer")
    min_texture: float = Field(0.003, ge=0, description="std of the reference window (grey in [0, 1]) below which "
                                                        "a pixel has no answer")
    max_step_px: float = Field(1.0, gt=0, description="depth hypotheses are this many pixels apart in the "
                                                      "widest-baseline source")
    min_planes: int = Field(16, ge=3, description="fewest planes on the coarsest level")
    max_planes: int = Field(384, ge=3, description="most planes on the coarsest level")
    coarse_size: int = Field(160, ge=16, description="the coarsest pyramid level's longer side in pixels: the "
                                                     "full sweep runs there, finer levels search around its answer")
    refine_steps: int = Field(3, ge=1, description="hypotheses each side of the coarser answer on finer levels")
    consistency_tolerance: float = Field(0.01, gt=0, description="relative depth difference within which "
                                                                 "another view's depth map agrees")
    min_consistent_views: int = Field(2, ge=0, description="other views that must agree for a depth to be kept "
                                                           "(0 keeps unfiltered depths)")
    matte_threshold: int = Field(128, ge=1, le=255, description="alpha from which a pixel is the subject")
    hull_resolution: int = Field(128, ge=16, description="visual hull voxels along the working box's side")
    hull_misses: int = Field(1, ge=0, description="cameras whose matte may exclude a voxel of the visual hull "
                                                  "(outvotes a bad matte)")
    hull_dilation_px: float = Field(1.0, ge=0, description="pixels the mattes are grown by before carving")
    holdout: HoldoutRequest = None  # hashed as the resolved set (in the input digest), never as the request
    workers: Workers = Field(0, description="views computed in parallel; 0 = one per CPU core (1 on CUDA)")
    volume_mb: float = knob(64.0, gt=0, description="memory budget of one view's score volume, per worker")
    preview_cameras: PreviewCameras = 4
    lock_timeout: LockTimeout = 0.0

    @field_validator("window")
    @classmethod
    def _window_is_odd(cls, window: int) -> int:
        if window % 2 == 0:
            raise ValueError(f"window must be odd, got {window}")
        return window
