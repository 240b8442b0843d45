"""One error base for the storage room, each error still the built-in it was, and the CLI's one-line rule for them."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np
import pytest
import zarr

import storage
from pipeline.cli import _is_user_error
from stages.core import errors as stage_errors
from storage import (
    ArraysDroppedError,
    CaptureStore,
    CaptureStoreError,
    MissingChunkError,
    SequenceLockedError,
    SequenceWorkDir,
    StorageError,
    UnknownCameraError,
    sequence_lock,
)
from storage.lock import SequenceFolderMissingError

# Each storage error and the built-in bases it had before StorageError existed (callers may catch those).
BUILT_IN_BASES = {CaptureStoreError: (ValueError,), UnknownCameraError: (KeyError,), SequenceLockedError: (RuntimeError,),
                  # a damaged store is a store that cannot be used (never "no such file": that means "not made yet")
                  MissingChunkError: (CaptureStoreError, ValueError),
                  SequenceFolderMissingError: (FileNotFoundError,),
                  ArraysDroppedError: (FileNotFoundError,)}


def _storage_error_classes() -> set[type]:
    found = set()
    for module in pkgutil.iter_modules(storage.__path__, "storage."):
        for _, value in inspect.getmembers(importlib.import_module(module.name), inspect.isclass):
            if issubclass(value, BaseException) and value.__module__.startswith("storage."):
                found.add(value)
    return found


def test_every_storage_error_is_a_storage_error_and_keeps_its_built_in_bases():
    classes = _storage_error_classes() - {StorageError}
    assert classes == set(BUILT_IN_BASES)  # a new storage error: add it here with its built-in base
    for error, bases in BUILT_IN_BASES.items():
        assert issubclass(error, StorageError) and all(issubclass(error, base) for base in bases), error
    assert not issubclass(MissingChunkError, OSError)


def _store(tmp_path) -> CaptureStore:
    return CaptureStore.create(str(tmp_path / "capture.zarr"), cameras=["221501007", "222200036"], n_frames=1,
                               height=4, width=4, fps=30.0, frame_indices=[0], intrinsics=None, world_2_cam=None)


def test_raised_storage_errors_are_caught_by_the_base_and_by_their_built_in(tmp_path):
    store = _store(tmp_path)
    with pytest.raises(StorageError) as unknown:
        store.camera_index("999")
    assert isinstance(unknown.value, KeyError) and str(unknown.value).startswith("camera")  # unquoted message

    zarr.create_array(str(tmp_path / "array.zarr"), shape=(2,), dtype=np.uint8)
    with pytest.raises(ValueError) as not_a_store:
        CaptureStore.open(str(tmp_path / "array.zarr"))
    assert isinstance(not_a_store.value, CaptureStoreError) and isinstance(not_a_store.value, StorageError)

    work = SequenceWorkDir.for_sequence(str(tmp_path / "work"), "001", "EXP-1")
    with pytest.raises(FileNotFoundError) as missing:  # only ingest makes the sequence folder
        with sequence_lock(work.uri):
            pass
    assert isinstance(missing.value, StorageError) and "no sequence folder at" in str(missing.value)
    with sequence_lock(work.uri, create=True), pytest.raises(RuntimeError) as locked:
        with sequence_lock(work.uri, timeout=0):
            pass
    assert isinstance(locked.value, StorageError) and "being written by another process" in str(locked.value)


def test_pipeline_errors_keep_the_built_in_they_resemble():
    assert issubclass(stage_errors.CalibrationError, ValueError)
    assert issubclass(stage_errors.CaptureLayoutError, ValueError)
    assert issubclass(stage_errors.VideoError, OSError)
    assert issubclass(stage_errors.StageOrderError, RuntimeError)
    assert str(stage_errors.VideoError("cam_1.mp4: cannot read video")) == "cam_1.mp4: cannot read video"
    for name, error in inspect.getmembers(stage_errors, inspect.isclass):
        assert issubclass(error, stage_errors.PipelineError), name


def test_the_cli_shows_every_storage_and_pipeline_error_in_one_line():
    raised = [CaptureStoreError("x is not a capture store"), UnknownCameraError("camera 9 unknown"),
              SequenceLockedError("/tmp/work/001/EXP-1", None, 0.0), SequenceFolderMissingError("/tmp/work/001/X"),
              MissingChunkError("/w/capture.zarr", "alpha", "222200036", 3, "alpha/c/1/3/0/0", "matte"),
              stage_errors.VideoError("bad video"),
              stage_errors.StageOrderError("run ingest first"), FileNotFoundError("raw folder")]
    assert all(_is_user_error(error) for error in raised)
    assert not any(_is_user_error(error) for error in (ValueError("a bug"), KeyError("a bug"), RuntimeError("a bug")))


def test_a_missing_chunk_error_survives_pickling_with_its_fields():
    import pickle

    error = MissingChunkError("/w/capture.zarr", "alpha", "222200036 (index 1)", 3, "alpha/c/1/3/0/0", "matte")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is MissingChunkError and str(copy) == str(error) and copy.frame == 3
    assert "run the matte stage again" in str(copy)
