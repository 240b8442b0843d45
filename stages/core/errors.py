"""Errors a user sees. Each message names the file, camera or value at fault.

Each one also keeps the built-in error it resembles as a second base (zarr-python's style), so a caller that
catches ``ValueError`` or ``OSError`` still catches it; ``PipelineError`` is what the CLI and the flows test for.
"""


class PipelineError(Exception):
    """Base class: bad input or a failed stage, reported without a traceback by the CLI."""


class CalibrationError(PipelineError, ValueError):
    """A camera_params.json (or an estimated calibration) that cannot be used."""


class VideoError(PipelineError, OSError):
    """A video that cannot be decoded or encoded (a file that is missing, truncated or refused by ffmpeg)."""


class CaptureLayoutError(PipelineError, ValueError):
    """A raw capture folder that does not follow the NeRSemble v2 layout."""


class StageOrderError(PipelineError, RuntimeError):
    """A stage was asked to run before the stage it needs."""
