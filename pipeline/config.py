"""Typed stage configurations: the CLI, the stages and the Prefect UI forms share these models."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator


class IngestConfig(BaseModel):
    """How raw videos become the capture store. Fields that change the stored data enter the config hash."""

    downscale: float = Field(1.0, ge=1.0, description="divide width and height by this factor (area resampling)")
    stride: int = Field(1, ge=1, description="keep every S-th frame; original indices are recorded")
    start: int = Field(0, ge=0, description="first source frame to keep")
    count: int | None = Field(None, ge=1, description="keep at most this many frames (after stride)")
    cameras: list[str] | None = Field(None, description="serials to ingest; all cameras when empty")
    color_correction: bool = Field(False, description="apply color_calibration.json (Cheung 2004, linear sRGB)")
    calibration_size: tuple[int, int] | None = Field(
        None, description="(width, height) the calibration's K is for; default: the videos' size"
    )
    workers: int = Field(0, ge=0, description="parallel camera decoders; 0 = one per CPU core")
    decoder_threads: int = Field(0, ge=0, description="ffmpeg threads per decoder; 0 = ffmpeg's choice")
    lock_timeout: float = Field(0.0, ge=0.0, description="seconds to wait for another writer of the sequence")

    @field_validator("cameras")
    @classmethod
    def _serials_are_strings(cls, cameras: list[str] | None) -> list[str] | None:
        return [str(c) for c in cameras] if cameras else None

    def result_fields(self) -> dict:
        """The fields that decide what is stored (execution knobs excluded), for the stage's config hash."""
        return self.model_dump(exclude={"workers", "decoder_threads", "lock_timeout"})


from typing import Literal  # noqa: E402 - kept beside the model that needs it


class CalibrateConfig(BaseModel):
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
    threads: int = Field(0, ge=0, description="COLMAP threads; 0 = one per CPU core")
    lock_timeout: float = Field(0.0, ge=0.0, description="seconds to wait for another writer of the sequence")

    def result_fields(self) -> dict:
        """The fields that decide the calibration (execution knobs excluded), for the stage's config hash."""
        return self.model_dump(exclude={"threads", "lock_timeout"})


class MatteConfig(BaseModel):
    """How the matte stage fills the store's alpha. Execution knobs and previews stay out of the config hash."""

    method: Literal["auto", "plate", "rembg", "fused"] = Field(
        "auto", description="plate: difference to the background plate; rembg: the saliency model; fused: both; "
                            "auto: fused for cameras with a plate, rembg for the others")
    model: str = Field("u2netp", description="rembg model name (looked up in the models folder) or a path to an "
                                             ".onnx file with a U2-Net-style single-image saliency model")
    plate_dir: str | None = Field(None, description="folder of image_<SERIAL>.jpg/png plates that replace the "
                                                    "ingested ones (e.g. re-shot plates)")
    low: float = Field(4.0, gt=0, description="plate residual (noise units) below which a pixel is backdrop")
    high: float = Field(9.0, gt=0, description="plate residual (noise units) above which a pixel is subject")
    brightness_weight: float = Field(
        1.0, ge=0, le=1, description="weight of pure brightness changes against hue changes; lower it where "
                                     "soft shadows fall on the backdrop")
    blind_threshold: float = Field(
        8.0, gt=0, description="fused: where the nearby subject colour is this close (noise units) to the plate, "
                               "the saliency model decides")
    edge_band: int = Field(2, ge=0, description="pixels either side of an edge solved by the compositing equation")
    guided_radius: int = Field(2, ge=1, description="radius of the edge-aware (guided) filter")
    guided_eps: float = Field(1e-3, gt=0, description="guided filter regularisation: larger smooths more")
    temporal_radius: int = Field(1, ge=0, description="neighbouring frames on each side that steady the matte")
    temporal_cutoff: float = Field(0.1, gt=0, description="frame change (summed over RGB in [0, 1]) from which a "
                                                          "neighbouring frame stops counting")
    min_speck: float = Field(2e-4, ge=0, description="foreground blobs smaller than this fraction of the frame "
                                                     "are dropped")
    max_hole: float = Field(0.02, ge=0, description="plate: enclosed holes up to this fraction of the frame are "
                                                    "filled (fused: holes the saliency model calls subject)")
    workers: int = Field(0, ge=0, description="cameras matted in parallel; 0 = one per CPU core")
    onnx_threads: int = Field(0, ge=0, description="threads per model inference; 0 = CPU cores / workers")
    preview_cameras: int = Field(4, ge=1, description="cameras in the preview contact sheet")
    preview_frames: int = Field(3, ge=1, description="frames per camera in the preview contact sheet")
    lock_timeout: float = Field(0.0, ge=0.0, description="seconds to wait for another writer of the sequence")

    @field_validator("high")
    @classmethod
    def _high_above_low(cls, high: float, info) -> float:  # noqa: ANN001 - pydantic's ValidationInfo
        low = info.data.get("low")
        if low is not None and high <= low:
            raise ValueError(f"high ({high}) must be above low ({low})")
        return high

    def result_fields(self) -> dict:
        """The fields that decide the alpha (execution knobs and previews excluded), for the config hash."""
        return self.model_dump(exclude={"workers", "onnx_threads", "preview_cameras", "preview_frames",
                                        "lock_timeout"})


class DepthConfig(BaseModel):
    """How the depth stage fills the store's depth maps. Execution knobs and previews stay out of the config hash."""

    method: Literal["auto", "sweep", "colmap"] = Field(
        "auto", description="sweep: multi-view plane-sweep stereo in torch; colmap: COLMAP PatchMatch stereo "
                            "(needs a CUDA build of pycolmap); auto: colmap where pycolmap has CUDA, else sweep")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the sweep runs; auto: CUDA if "
                                                                         "torch sees a GPU, else CPU")
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
    workers: int = Field(0, ge=0, description="views computed in parallel; 0 = one per CPU core (1 on CUDA)")
    volume_mb: float = Field(64.0, gt=0, description="memory budget of one view's score volume, per worker")
    preview_cameras: int = Field(4, ge=1, description="cameras in the preview sheet")
    lock_timeout: float = Field(0.0, ge=0.0, description="seconds to wait for another writer of the sequence")

    @field_validator("window")
    @classmethod
    def _window_is_odd(cls, window: int) -> int:
        if window % 2 == 0:
            raise ValueError(f"window must be odd, got {window}")
        return window

    def result_fields(self) -> dict:
        """The fields that decide the depth maps (execution knobs and previews excluded), for the config hash."""
        return self.model_dump(exclude={"device", "workers", "volume_mb", "preview_cameras", "lock_timeout"})


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
        return self.model_dump(exclude={"device", "encoding", "time_budget_s", "checkpoint_every", "resume",
                                        "threads", "lock_timeout"})


# Export and evaluate both choose the render step of a trained model (the weights do not depend on it).
RenderSubsteps = Annotated[int | None, Field(ge=1, description="renders march the model's training step / this; "
                                                               "default: as trained (the optimize preset's "
                                                               "sampler.eval_substeps)")]


def _without_defaulted_render_step(fields: dict) -> dict:
    """Result fields minus an unset ``eval_substeps``, so records written before that option existed still match."""
    if fields.get("eval_substeps") is None:
        fields.pop("eval_substeps", None)
    return fields


class ExportConfig(BaseModel):
    """What the export stage renders from the trained model, and how it encodes it."""

    turntable: bool = Field(True, description="render the turntable video (export/turntable.mp4)")
    holdout: bool = Field(True, description="render every hold-out camera for every frame (export/holdout/)")
    path: str | None = Field(None, description="camera path JSON (keyframes of K, world_2_cam, time) to render")
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
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if torch sees a GPU")
    chunk: int = Field(8192, ge=256, description="rays rendered at once (bounds memory at any resolution)")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    lock_timeout: float = Field(0.0, ge=0.0, description="seconds to wait for another writer of the sequence")

    @field_validator("path_cameras")
    @classmethod
    def _path_serials_are_strings(cls, cameras: list[str] | None) -> list[str] | None:
        return [str(c) for c in cameras] if cameras else None

    def result_fields(self) -> dict:
        return _without_defaulted_render_step(self.model_dump(exclude={"device", "chunk", "threads", "lock_timeout"}))


class EvaluateConfig(BaseModel):
    """The hold-out protocol: which frames, against what reference, with which metrics."""

    timesteps: int = Field(15, ge=0, description="evenly spaced frames per hold-out camera; 0 = all")
    lpips: bool = Field(True, description="LPIPS when its backbone weights are available offline (never downloaded)")
    eval_substeps: RenderSubsteps = None
    ground_truth: str | None = Field(
        None, description="a synthetic capture's ground_truth.zarr: also score against its exact images; "
                          "default: the one beside the ingested videos, when there is one")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if torch sees a GPU")
    chunk: int = Field(8192, ge=256, description="rays rendered at once")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    lock_timeout: float = Field(0.0, ge=0.0, description="seconds to wait for another writer of the sequence")

    def result_fields(self) -> dict:
        return _without_defaulted_render_step(self.model_dump(exclude={"device", "chunk", "threads", "lock_timeout"}))
