"""Dropping a finished sequence's bulky arrays: bytes freed, metadata and records kept, reads refused clearly."""

from __future__ import annotations

import numpy as np
import pytest

from storage import ArraysDroppedError, CaptureStore, StageRecord, StorageError
from storage.lifecycle import drop_arrays, dropped_arrays, tree_bytes


def _store(tmp_path) -> CaptureStore:
    store = CaptureStore.create(str(tmp_path / "capture.zarr"), cameras=["00", "01"], n_frames=3, height=16,
                                width=12, fps=30.0, frame_indices=[0, 1, 2], intrinsics=None, world_2_cam=None)
    rng = np.random.default_rng(0)
    for camera in range(2):
        store.write_frames(camera, 0, rng.integers(0, 255, (3, 16, 12, 3), dtype=np.uint8))
        store.write_background(camera, np.full((16, 12, 3), 90, np.uint8))
        for t in range(3):
            store.write_alpha(camera, t, np.full((16, 12), 255, np.uint8))
            store.write_depth(camera, t, np.full((16, 12), 1.0, np.float32))
    store.write_stage_record(StageRecord(stage="export", version="1", config_hash="abc", input_digest="def",
                                         finished_at="2026-01-01T00:00:00+00:00", report={}))
    return store


def test_dropping_frees_the_arrays_and_keeps_everything_else(tmp_path):
    store = _store(tmp_path)
    before = tree_bytes(store.uri)
    freed = drop_arrays(store, reason="test")
    assert 0 < freed < before and abs(tree_bytes(store.uri) - (before - freed)) < 1000  # attrs grew a little
    reopened = CaptureStore.open(store.uri)
    assert dropped_arrays(reopened) == ["alpha", "depth", "frames"]
    assert (reopened.n_cameras, reopened.n_frames, reopened.height, reopened.width) == (2, 3, 16, 12)
    assert "export" in reopened.stage_records() and reopened.cameras == ["00", "01"]
    assert reopened.read_background(1)[0, 0, 0] == 90  # plates stay: they are small


@pytest.mark.parametrize("read", [lambda s: s.read_frame(0, 0), lambda s: s.read_alpha(1, 2),
                                  lambda s: s.read_depth(0, 1), lambda s: s.read_pixels("frames", 0, 0, [1], [1])])
def test_reading_a_dropped_array_says_so_and_how_to_get_it_back(tmp_path, read):
    store = _store(tmp_path)
    drop_arrays(store, reason="dropped after export")
    with pytest.raises(ArraysDroppedError, match=r"were dropped on .*dropped after export.*ingest the sequence again"):
        read(CaptureStore.open(store.uri))
    assert issubclass(ArraysDroppedError, StorageError)


def test_only_the_bulky_arrays_can_be_dropped(tmp_path):
    with pytest.raises(ValueError, match="backgrounds"):
        drop_arrays(_store(tmp_path), reason="test", arrays=("backgrounds",))
