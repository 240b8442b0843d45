"""Every error the storage room raises on purpose, under one base.

``StorageError`` lets a caller catch "the store, the work folder or the lock said no" in one clause (the CLI
shows these as one line, not a traceback). Each error also keeps the built-in it resembles as a base, as
zarr-python does (``NodeNotFoundError(BaseZarrError, FileNotFoundError)``), so code that catches the built-in
keeps working. :class:`storage.lock.SequenceLockedError` and :class:`storage.lock.SequenceFolderMissingError` live
beside the lock whose file and folder their messages name.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of the storage room's own errors."""


class CaptureStoreError(StorageError, ValueError):
    """The URI holds something that is not a usable capture store."""


class MissingChunkError(CaptureStoreError):
    """A chunk that a read needs is not in the store: the store is damaged (names array, camera, frame).

    A ``ValueError`` through :class:`CaptureStoreError`, like every "this store is not usable" error; not a
    ``FileNotFoundError``, which callers read as "no store yet" rather than "a store with data lost".
    """

    def __init__(self, uri: str, array: str, camera: str | None, frame: int | None, key: str,
                 writer: str = "ingest"):
        self.uri, self.array, self.camera, self.frame, self.key, self.writer = uri, array, camera, frame, key, writer
        where = ", ".join(p for p in (f"camera {camera}" if camera is not None else "",
                                      f"frame {frame}" if frame is not None else "") if p)
        super().__init__(
            f"{uri}: the {array} chunk of {where} is missing ({key}); the store is damaged, so nothing is read "
            f"in its place: run the {writer} stage again to rewrite it"
        )

    def __reduce__(self) -> tuple:  # a failed task's exception is pickled: rebuild it from its fields
        return type(self), (self.uri, self.array, self.camera, self.frame, self.key, self.writer)


class UnknownCameraError(StorageError, KeyError):
    """A camera serial (or index) that the store does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ArraysDroppedError(StorageError, FileNotFoundError):
    """A capture store's frame, alpha or depth arrays were dropped to save space after its export."""
