"""Which sequences have a viewer running, so the Prefect UI can link to it: ``<SEQ>/viewer/running.json``.

``nersemble-pipeline view`` writes the file (its URL, host and process id) when it starts serving and removes it
when it stops; a killed viewer leaves it behind, so a reader trusts it only while that process is alive on this
host. It lives with the sequence's other outputs so every flow run that has the work folder can find it.
"""

from __future__ import annotations

import os
import socket

from storage.work_dir import SequenceWorkDir

MARKER = "viewer/running.json"


def announce_viewer(work: SequenceWorkDir, url: str) -> None:
    """Record that a viewer for ``work`` serves on ``url`` from this process."""
    work.write_json(MARKER, {"url": url, "host": socket.gethostname(), "pid": os.getpid()})


def withdraw_viewer(work: SequenceWorkDir) -> None:
    """Remove this process's record (another viewer's, started since, stays)."""
    record = _read(work)
    if record is not None and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        work.remove(MARKER)


def running_viewer_url(work: SequenceWorkDir) -> str | None:
    """The URL of a viewer serving ``work`` from a live process on this host, else None."""
    record = _read(work)
    if record is None or record.get("host") != socket.gethostname():
        return None  # another host's process cannot be checked from here
    try:
        os.kill(int(record["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(record.get("url") or "") or None


def _read(work: SequenceWorkDir) -> dict | None:
    try:
        record = work.read_json(MARKER)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
