"""The calibrate stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.core.fields import LockTimeout, StageConfig, Threads


class CalibrateConfig(StageConfig):
    """How the calibrate stage finds each camera's K and world_2_cam. Execution knobs stay out of the config hash."""

    mode: Literal["auto", "provided", "colmap", "refine"] = Field(
        "auto", description="provided: the ingested camera_params.json; colmap: estimate from the frames; "
                            "refine: bundle-adjust the provided one; auto: provided when present, else colmap")
    timesteps: int = Field(8, ge=1, description="frames per camera (evenly spaced) whose features that camera pools")
    shared_intrinsics: bool = Field(False, description="one K for every camera instead of one per camera")
    focal: Literal["auto", "fixed", "refine"] = Field(
        "auto", description="focal lengths: fixed at the provided K, or refined; auto: fixed when a calibration "
                            "was provided and intrinsics are per camera, else refined")
    use_masks: bool = Field(False, description="keep only features on the matte's foreground (needs the matte stage)")
    subject_distance: float = Field(
        1.0, gt=0, description="metres from the cameras to the subject: fixes scale and origin when no "
                               "calibration was provided")
    focal_guess: float = Field(2.0, gt=0, description="starting focal length per pixel of the longest side, "
                                                      "when no calibration was provided")
    max_features: int = Field(8192, ge=64, description="SIFT features per frame at most")
    min_inliers: int = Field(15, ge=8, description="verified matches a camera pair needs to count")
    max_reprojection_error: float = Field(1.0, gt=0, description="px; a camera whose median error is above fails")
    min_observations: int = Field(50, ge=1, description="triangulated points a camera must see")
    max_focal_deviation: float = Field(0.2, gt=0, description="largest relative focal change from the provided K")
    max_rotation_error_deg: float = Field(
        2.0, gt=0, description="largest rotation (deg) a camera may differ from the provided calibration "
                               "(colmap, after similarity alignment) or move (refine)")
    max_center_error_mm: float = Field(50.0, gt=0, description="the same for camera centres, in mm")
    seed: int = Field(0, ge=0, description="RANSAC and mapper seed")
    threads: Threads = Field(0, description="COLMAP threads; 0 = one per CPU core")
    lock_timeout: LockTimeout = 0.0
