"""Every error the storage room raises on purpose, under one base.

``StorageError`` lets a caller catch "the store, the work folder or the lock said no" in one clause (the CLI
shows these as one line, not a traceback). Each error also keeps the built-in it resembles as a base, as
zarr-python does (``NodeNotFoundError(BaseZarrError, FileNotFoundError)``), so code that catches the built-in
keeps working. :class:`storage.lock.SequenceLockedError` lives beside the lock whose file its message names.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of the storage room's own errors."""


class CaptureStoreError(StorageError, ValueError):
    """The URI holds something that is not a usable capture store."""


class UnknownCameraError(StorageError, KeyError):
    """A camera serial (or index) that the store does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class ArraysDroppedError(StorageError, FileNotFoundError):
    """A capture store's frame, alpha or depth arrays were dropped to save space after its export."""
