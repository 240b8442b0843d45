"""Where data lives: the zarr capture store, the per-sequence work folder, stage records, locks, one error base.

Imports only the standard library, numpy, zarr, numcodecs and fsspec. Names are loaded lazily
so that ``import storage.lock`` (taken at the start of every flow run and CLI call) does not
pay for importing zarr.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.capture_store import ARRAY_NAMES, CaptureStore
    from storage.errors import (ArraysDroppedError, CaptureStoreError, MissingChunkError, StorageError,
                                UnknownCameraError)
    from storage.lock import SequenceLockedError, sequence_lock
    from storage.records import StageRecord, config_hash, digest_of
    from storage.work_dir import SequenceWorkDir

_EXPORTS = {
    "ARRAY_NAMES": "storage.capture_store",
    "CaptureStore": "storage.capture_store",
    "ArraysDroppedError": "storage.errors",
    "CaptureStoreError": "storage.errors",
    "MissingChunkError": "storage.errors",
    "StorageError": "storage.errors",
    "UnknownCameraError": "storage.errors",
    "SequenceLockedError": "storage.lock",
    "sequence_lock": "storage.lock",
    "StageRecord": "storage.records",
    "config_hash": "storage.records",
    "digest_of": "storage.records",
    "SequenceWorkDir": "storage.work_dir",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
