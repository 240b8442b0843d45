"""Storage lifecycle of a finished sequence: drop the bulky arrays once its export has succeeded.

A sequence's frames, alpha and depth are by far the largest part of its work folder and are needed only to
train and score; the calibration, the model, the exports and the reports are small and stay. Dropping keeps
the store's attrs and stage records, so the archive ledger still counts the sequence as finished and re-runs
skip it. Reading a dropped array raises :class:`~storage.errors.ArraysDroppedError` that says how to get the
arrays back (ingest runs again when its arrays were dropped, and the stages after it follow).
"""

from __future__ import annotations

from datetime import datetime, timezone

from storage import uri as uris
from storage.capture_store import CaptureStore

DROPPABLE = ("frames", "alpha", "depth")
DROPPED_ATTR = "dropped_arrays"


def tree_bytes(uri: str) -> int:
    """Bytes of every file under ``uri`` (0 when nothing is there)."""
    uri = uris.normalize(uri)
    fs, path = uris.filesystem(uri)
    if not fs.exists(path):
        return 0
    return int(fs.du(path, total=True))


def dropped_arrays(store: CaptureStore) -> list[str]:
    """Names of the arrays dropped from this store (empty for a store that has them all)."""
    return list((store.attrs.get(DROPPED_ATTR) or {}).get("arrays") or [])


def drop_arrays(store: CaptureStore, reason: str, arrays: tuple[str, ...] = DROPPABLE) -> int:
    """Delete the chunks of ``arrays`` (metadata, attrs and stage records stay); returns the bytes freed.

    The attr is written first: a run killed mid-way leaves a store that says its arrays are gone, never one
    whose missing chunks would silently read as zeros.
    """
    unknown = [name for name in arrays if name not in DROPPABLE]
    if unknown:
        raise ValueError(f"only {', '.join(DROPPABLE)} can be dropped, not {', '.join(unknown)}")
    previous = store.attrs.get(DROPPED_ATTR) or {}
    names = sorted(set(dropped_arrays(store)) | set(arrays))
    info = {"arrays": names, "reason": reason, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "bytes_freed": int(previous.get("bytes_freed", 0))}
    store.set_attr(DROPPED_ATTR, info)
    fs, path = uris.filesystem(store.uri)
    freed = 0
    for name in arrays:
        chunks = f"{path.rstrip('/')}/{name}/c"  # zarr v3's chunk key prefix: the array's metadata stays
        if fs.exists(chunks):
            freed += int(fs.du(chunks, total=True))
            fs.rm(chunks, recursive=True)
    store.set_attr(DROPPED_ATTR, {**info, "bytes_freed": info["bytes_freed"] + freed})
    return freed
