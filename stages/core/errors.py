"""Errors a user sees. Each message names the file, camera or value at fault."""


class PipelineError(Exception):
    """Base class: bad input or a failed stage, reported without a traceback by the CLI."""


class CalibrationError(PipelineError):
    """A camera_params.json (or an estimated calibration) that cannot be used."""


class VideoError(PipelineError):
    """A video that cannot be decoded or encoded."""


class CaptureLayoutError(PipelineError):
    """A raw capture folder that does not follow the NeRSemble v2 layout."""


class StageOrderError(PipelineError):
    """A stage was asked to run before the stage it needs."""
