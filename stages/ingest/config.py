"""The ingest stage's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from stages.core.fields import LockTimeout, StageConfig, Workers, knob


class IngestConfig(StageConfig):
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
    workers: Workers = Field(0, description="parallel camera decoders; 0 = one per CPU core")
    decoder_threads: int = knob(0, ge=0, description="ffmpeg threads per decoder; 0 = ffmpeg's choice")
    # Every codec is lossless, so the codec changes the store's bytes and speed but no stored value: it is a
    # knob, outside the config hash, and a store ingested with another codec is kept (delete it to re-encode).
    codec: Literal["zstd", "lz4", "none"] = knob(
        "zstd", description="store compression: zstd (small), lz4 (faster, larger), none (fastest, largest)")
    lock_timeout: LockTimeout = 0.0

    @field_validator("cameras")
    @classmethod
    def _serials_are_strings(cls, cameras: list[str] | None) -> list[str] | None:
        return [str(c) for c in cameras] if cameras else None
