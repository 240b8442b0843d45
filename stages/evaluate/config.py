"""The evaluate stage's settings: the hold-out protocol."""

from __future__ import annotations

from pydantic import Field

from stages.core.fields import Device, LockTimeout, RayChunk, RenderSubsteps, StageConfig, Threads


class EvaluateConfig(StageConfig):
    """The hold-out protocol: which frames, against what reference, with which metrics."""

    timesteps: int = Field(15, ge=0, description="evenly spaced frames per hold-out camera; 0 = all")
    lpips: bool = Field(True, description="LPIPS when its backbone weights are available offline (never downloaded)")
    eval_substeps: RenderSubsteps = None
    ground_truth: str | None = Field(
        None, description="a synthetic capture's ground_truth.zarr: also score against its exact images; "
                          "default: the one beside the ingested videos, when there is one")
    device: Device = "auto"
    chunk: RayChunk = 8192
    threads: Threads = 0
    lock_timeout: LockTimeout = 0.0
