"""Depth's automatic worker count keeps the stage inside its memory at the benchmark size on any number of cores,
and hands the cores it leaves to each worker's torch threads."""

from __future__ import annotations

import torch

from stages.depth import stage
from stages.depth.config import DepthConfig

CPU = torch.device("cpu")


def _need(cameras: int, workers: int, height: int, width: int) -> int:
    frame = height * width * 3
    return (cameras * stage.TIMESTEP_FRAMES_PER_CAMERA + workers * stage.WORKER_FRAMES) * frame


def test_many_cores_at_1604x1100_run_as_many_workers_as_memory_allows(monkeypatch):
    monkeypatch.setattr(stage.os, "cpu_count", lambda: 64)
    workers = stage.worker_count(DepthConfig(), CPU, 16, 1604, 1100)
    assert 1 <= workers < 16 and _need(16, workers, 1604, 1100) <= stage.MEMORY_BUDGET
    assert stage.worker_threads(CPU, workers) == 64 // workers  # the other cores are not left idle
    assert stage.worker_count(DepthConfig(), CPU, 16, 802, 550) == 16  # small frames: one per view
    assert stage.worker_threads(CPU, 64) == 1


def test_workers_asked_for_and_a_gpu_are_as_before(monkeypatch):
    monkeypatch.setattr(stage.os, "cpu_count", lambda: 64)
    assert stage.worker_count(DepthConfig(workers=12), CPU, 16, 1604, 1100) == 12
    assert stage.worker_count(DepthConfig(), torch.device("cuda"), 16, 1604, 1100) == 1
