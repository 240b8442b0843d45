"""The evaluate stage's settings: the hold-out protocol."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from stages.core.fields import RenderSubsteps, without_defaulted_render_step


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
        return without_defaulted_render_step(self.model_dump(exclude={"device", "chunk", "threads", "lock_timeout"}))
