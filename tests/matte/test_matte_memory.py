"""Matting memory stays bounded at the benchmark size: the per-frame working set the worker count assumes is
honest, and the automatic worker count keeps the workers inside the budget on any number of cores."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from stages.matte import stage
from stages.matte.config import MatteConfig
from stages.matte.methods import matte_fused, matte_plate
from stages.matte.plate import to_float


@pytest.mark.parametrize("method", ["plate", "fused"])
def test_one_frames_matting_fits_the_working_set_the_workers_are_sized_by(method):
    height, width = 402, 276
    rng = np.random.default_rng(0)
    plate = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    frame = plate.copy()
    frame[100:300, 70:200] = 128  # a subject in front of the plate
    mask = np.zeros((height, width), np.float32)
    mask[100:300, 70:200] = 1.0
    config = MatteConfig()
    tracemalloc.start()
    if method == "plate":
        matte_plate(to_float(frame), to_float(plate), config)
    else:
        matte_fused(to_float(frame), to_float(plate), mask, config)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= stage.FRAME_WORKING_SET * frame.nbytes


def test_automatic_workers_stay_inside_the_memory_budget_on_many_cores(monkeypatch):
    monkeypatch.setattr(stage.os, "cpu_count", lambda: 64)
    frame_bytes = 1604 * 1100 * 3
    workers = stage._worker_count(MatteConfig(), 16, 1604, 1100)
    assert 1 <= workers < 16 and workers * stage.FRAME_WORKING_SET * frame_bytes <= stage.WORKERS_MEMORY_BUDGET
    assert stage._worker_count(MatteConfig(), 16, 320, 220) == 16  # small frames: one per camera
    assert stage._worker_count(MatteConfig(workers=12), 16, 1604, 1100) == 12  # asked for: honoured
