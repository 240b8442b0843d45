"""Ingest's memory does not grow with the sequence: ten times the frames, the same peak."""

from __future__ import annotations

import tracemalloc

from pipeline.synthetic import synthesize_capture
from stages.ingest.config import IngestConfig
from stages.ingest.stage import ingest_sequence

WIDTH, HEIGHT, FRAMES = 128, 192, 40


def _peak(sequence_dir, work_root: str, count: int) -> int:
    tracemalloc.start()
    try:
        report = ingest_sequence(sequence_dir, work_root, IngestConfig(count=count, workers=2))
        assert report["frames"] == count
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_is_the_same_for_4_and_40_frames(tmp_path):
    capture = synthesize_capture(tmp_path / "archive", cameras=4, frames=FRAMES, width=WIDTH, height=HEIGHT, seed=1)
    frame_bytes = WIDTH * HEIGHT * 3
    few = _peak(capture.sequence_dir, str(tmp_path / "few"), 4)
    many = _peak(capture.sequence_dir, str(tmp_path / "many"), FRAMES)
    # Holding a camera's sequence would add 36 frames per worker; a few frames per worker is the design.
    assert many <= few + 2 * frame_bytes, (few, many)
    assert many <= 2 * 8 * frame_bytes + (1 << 20)  # 2 workers x a few frames, plus a MiB of bookkeeping
