"""The stage table: every stage once, in pipeline order, with what it needs, runs, writes and shows.

Flows, the CLI, the artifacts and the ledger read this table instead of keeping lists of their own. It imports
no stage code: entry points are dotted paths, loaded when a stage runs, so reading the table stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class OutputLink:
    """A file worth a link (and, for images, a picture) in the UI, relative to the sequence's work folder."""

    key: str
    label: str
    path: str


@dataclass(frozen=True)
class Stage:
    """One row of the table.

    ``requires``: stages whose records must exist before this one runs (``ingest``, which every later stage
    needs, included). ``inputs``: the stages whose records this one's outputs depend on, optional ones included;
    ``stages.core.skeleton.run_stage`` checks the first and digests the second. Calibrate adds ``matte`` to
    both when its config masks the features (it decides that from its config at run time).
    ``entry``: ``module:function`` taking the stage's input location and its config and returning a report.
    ``summary_keys``: the report keys an operator wants in the one log line per stage and the run overview
    (``flows.figures`` formats them), in the order they are read.
    """

    name: str
    summary: str
    requires: tuple[str, ...]
    inputs: tuple[str, ...]
    entry: str
    command: str
    outputs: tuple[str, ...] = ()
    links: tuple[OutputLink, ...] = ()
    summary_keys: tuple[str, ...] = ()

    def entry_point(self) -> Callable[..., dict]:
        """The stage's function, imported on first use (stage modules pull in torch, zarr, COLMAP)."""
        module, _, function = self.entry.partition(":")
        return getattr(importlib.import_module(module), function)


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("ingest", "raw videos -> the chunked capture store", (), (),
          "stages.ingest.stage:ingest_sequence", "nersemble-pipeline ingest <RAW_SEQUENCE_DIR> --work <WORK>",
          outputs=("capture.zarr/frames", "capture.zarr/backgrounds"),
          summary_keys=("cameras", "frames", "size", "decode_seconds")),
    Stage("calibrate", "each camera's K and world_2_cam", ("ingest",), ("ingest",),
          "stages.calibrate.stage:calibrate_sequence", "nersemble-pipeline calibrate <SEQUENCE_WORK_DIR>",
          outputs=("calibration/",),
          summary_keys=("solution", "cameras_total", "reprojection_error_px", "timings_s")),
    Stage("matte", "alpha per frame (plate, rembg or both)", ("ingest",), ("ingest",),
          "stages.matte.stage:matte_sequence", "nersemble-pipeline matte <SEQUENCE_WORK_DIR>",
          outputs=("capture.zarr/alpha", "export/previews/matte.png"),
          links=(OutputLink("matte-preview", "matte preview", "export/previews/matte.png"),),
          summary_keys=("method", "cameras", "frames_matted", "coverage", "seconds")),
    Stage("depth", "per-view depth maps by multi-view stereo", ("ingest", "calibrate", "matte"),
          ("ingest", "calibrate", "matte"),
          "stages.depth.stage:depth_sequence", "nersemble-pipeline depth <SEQUENCE_WORK_DIR>",
          outputs=("capture.zarr/depth", "export/previews/depth.png"),
          links=(OutputLink("depth-preview", "depth preview", "export/previews/depth.png"),),
          summary_keys=("method", "coverage", "seconds")),
    Stage("optimize", "the NeRSemble radiance field", ("ingest", "calibrate", "matte"),
          ("ingest", "calibrate", "matte", "depth"),
          "stages.optimize.stage:optimize_sequence", "nersemble-pipeline optimize <SEQUENCE_WORK_DIR>",
          outputs=("nersemble/",),
          links=(OutputLink("training-curves", "training curves", "nersemble/training_curves.png"),),
          summary_keys=("steps", "psnr_train", "train_seconds", "stopped_by")),
    Stage("export", "turntable, hold-out and path videos", ("ingest", "calibrate", "matte", "optimize"),
          ("ingest", "calibrate", "matte", "optimize"),
          "stages.export.stage:export_sequence", "nersemble-pipeline export <SEQUENCE_WORK_DIR>",
          outputs=("export/",),
          links=(OutputLink("turntable", "turntable video", "export/turntable.mp4"),),
          summary_keys=("frames", "seconds")),
    Stage("evaluate", "hold-out scores", ("ingest", "calibrate", "matte", "optimize"),
          ("ingest", "calibrate", "matte", "optimize"),
          "stages.evaluate.stage:evaluate_sequence", "nersemble-pipeline evaluate <SEQUENCE_WORK_DIR>",
          outputs=("export/metrics.json",),
          links=(OutputLink("metrics", "hold-out metrics", "export/metrics.json"),),
          summary_keys=("psnr", "ssim", "lpips", "images", "seconds")),
)

STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGE_TABLE)
STAGES_BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGE_TABLE}


def stage(name: str) -> Stage:
    """The table row of ``name``; a KeyError lists the known stages."""
    try:
        return STAGES_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; available: {', '.join(STAGE_NAMES)}") from None
