"""The matte stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from stages.core.fields import Device, LockTimeout, PreviewCameras, StageConfig, Workers, knob


class MatteConfig(StageConfig):
    """How the matte stage fills the store's alpha. Execution knobs and previews stay out of the config hash."""

    method: Literal["auto", "plate", "rembg", "fused"] = Field(
        "auto", description="plate: difference to the background plate; rembg: the saliency model; fused: both; "
                            "auto: fused for cameras with a plate, rembg for the others. rembg and fused (so auto) run the "
                            "saliency model on every frame: many times slower than plate on a CPU")
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
    workers: Workers = Field(0, description="cameras matted in parallel; 0 = one per CPU core")
    onnx_threads: int = knob(0, ge=0, description="threads per model inference; 0 = CPU cores / workers")
    device: Device = Field("auto", description="where the saliency model runs: auto = onnxruntime's CUDA provider "
                                               "where installed (onnxruntime-gpu), else CPU")
    preview_cameras: PreviewCameras = Field(4, description="cameras in the preview contact sheet")
    preview_frames: int = knob(3, ge=1, description="frames per camera in the preview contact sheet")
    lock_timeout: LockTimeout = 0.0

    @field_validator("high")
    @classmethod
    def _high_above_low(cls, high: float, info) -> float:
        low = info.data.get("low")
        if low is not None and high <= low:
            raise ValueError(f"high ({high}) must be above low ({low})")
        return high
