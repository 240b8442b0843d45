"""The one vocabulary for a stage report's ``status``.

A ``str`` enum: reports stay plain JSON (``"completed"``), and a report read back from disk compares equal to the
member (``report["status"] == Status.COMPLETED``). Reports written before this enum existed may say ``"done"``
(optimize did); :meth:`Status.of` reads that as completed.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """How a stage run ended."""

    COMPLETED = "completed"  # ran and wrote its outputs and record
    SKIPPED = "skipped"  # its record matched: nothing to do
    FALLBACK = "fallback"  # calibrate: the estimate failed its checks, the provided calibration was written
    FAILED = "failed"  # wrote a report naming what failed, and no record
    INTERRUPTED = "interrupted"  # optimize: stopped on a signal after a checkpoint and a report, no record (resumes)

    @classmethod
    def of(cls, value: object) -> Status | None:
        """The status a report's value means; None for an unknown or missing one. Old reports' "done" is completed."""
        if value == "done":
            return cls.COMPLETED
        try:
            return cls(value)
        except ValueError:
            return None

