"""The per-sequence work folder ``<work>/<PID>/<SEQ>/`` and the files stages keep in it."""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from typing import Any

from storage import uri as uris
from storage.lock import sequence_lock
from storage.records import to_jsonable

_STAGE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


class SequenceWorkDir:
    """``<work>/<PID>/<SEQ>/``: capture.zarr, calibration/, nersemble/, export/, reports/<stage>.json.

    Only URIs are handed around (to Prefect tasks, other processes), so this object is cheap and
    holds no open handles; every method goes through fsspec, or plain os calls on local disks
    where that buys atomic renames.
    """

    def __init__(self, uri: str | os.PathLike[str]):
        self.uri: str = uris.normalize(uri)
        self._fs, self._root = uris.filesystem(self.uri)

    @classmethod
    def for_sequence(cls, work_root: str | os.PathLike[str], participant: str, sequence: str) -> SequenceWorkDir:
        """The folder for one sequence; names are kept verbatim (``+`` and ``_`` included)."""
        for label, name in (("participant", participant), ("sequence", sequence)):
            if not str(name) or "/" in str(name) or str(name) in (".", ".."):
                raise ValueError(f"invalid {label} name {name!r}: it becomes a folder name")
        return cls(uris.join(uris.normalize(work_root), str(participant), str(sequence)))

    def __repr__(self) -> str:
        return f"SequenceWorkDir({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SequenceWorkDir) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def participant(self) -> str:
        """The parent folder's name (the participant id)."""
        return uris.basename(uris.parent(self.uri))

    @property
    def sequence(self) -> str:
        """This folder's name (the sequence name)."""
        return uris.basename(self.uri)

    @property
    def capture_uri(self) -> str:
        return self.path("capture.zarr")

    @property
    def calibration_uri(self) -> str:
        return self.path("calibration")

    @property
    def nersemble_uri(self) -> str:
        return self.path("nersemble")

    @property
    def export_uri(self) -> str:
        return self.path("export")

    @property
    def reports_uri(self) -> str:
        return self.path("reports")

    @property
    def is_local(self) -> bool:
        return uris.is_local(self.uri)

    def path(self, *parts: str) -> str:
        """URI of a file or folder inside this sequence folder."""
        return uris.join(self.uri, *parts)

    def _fs_path(self, *parts: str) -> str:
        return uris.join(self._root, *parts)

    def lock(self, *, timeout: float = 0.0, poll: float = 0.2, create: bool = False):  # noqa: ANN201
        """``sequence_lock`` on this folder (``create``: make the folder if it does not exist yet)."""
        return sequence_lock(self.uri, timeout=timeout, poll=poll, create=create)

    def makedirs(self, *parts: str) -> str:
        """Create a folder inside (and its parents); returns its URI."""
        self._fs.makedirs(self._fs_path(*parts), exist_ok=True)
        return self.path(*parts)

    def exists(self, *parts: str) -> bool:
        return bool(self._fs.exists(self._fs_path(*parts)))

    def remove(self, rel_path: str) -> None:
        """Delete a file inside; nothing happens when it is not there."""
        target = self._fs_path(rel_path)
        if self._fs.exists(target):
            self._fs.rm(target)

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) of the entries in a folder inside; [] if it does not exist."""
        target = self._fs_path(*parts)
        if not self._fs.isdir(target):
            return []
        return sorted(uris.basename(p) for p in self._fs.ls(target, detail=False))

    def write_bytes(self, rel_path: str, data: bytes) -> str:
        """Write a file inside, atomically where the filesystem allows; returns its URI.

        Local disks: write a temp file beside it, fsync it and ``os.replace`` it, so a reader never
        sees half a file even if the writer (or the machine) dies. Object stores: one PUT is already
        atomic. An OS error that carries no file name (a full disk mid-write) is given this one.
        """
        parts = rel_path.strip("/").split("/")
        target = self._fs_path(*parts)
        parent_dir = uris.parent(target)
        self._fs.makedirs(parent_dir, exist_ok=True)
        if self.is_local:
            fd, tmp = tempfile.mkstemp(prefix=f".{parts[-1]}.", suffix=".tmp", dir=parent_dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except OSError as error:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                if error.filename is None and error.errno is not None:
                    raise type(error)(error.errno, error.strerror or str(error), target) from error
                raise
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            tmp = f"{parent_dir}/.{parts[-1]}.{uuid.uuid4().hex}.tmp"
            try:
                self._fs.pipe_file(tmp, data)
                self._fs.mv(tmp, target)
            except (NotImplementedError, OSError):
                if self._fs.exists(tmp):
                    self._fs.rm_file(tmp)
                self._fs.pipe_file(target, data)
        return self.path(*parts)

    def append_text(self, rel_path: str, text: str) -> str:
        """Append to a text file inside (a log), creating it; returns its URI.

        Local disks append in place and flush, so the lines survive a killed writer; object stores
        have no append, so the file is read and written back whole.
        """
        parts = rel_path.strip("/").split("/")
        target = self._fs_path(*parts)
        if self.is_local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
            return self.path(*parts)
        return self.write_text(rel_path, (self.read_text(rel_path) or "") + text)

    def read_bytes(self, rel_path: str) -> bytes | None:
        """Contents of a file inside, or None if it does not exist."""
        try:
            return bytes(self._fs.cat_file(self._fs_path(*rel_path.strip("/").split("/"))))
        except FileNotFoundError:
            return None

    def write_text(self, rel_path: str, text: str) -> str:
        return self.write_bytes(rel_path, text.encode("utf-8"))

    def read_text(self, rel_path: str) -> str | None:
        data = self.read_bytes(rel_path)
        return None if data is None else data.decode("utf-8")

    def write_json(self, rel_path: str, obj: Any) -> str:
        """Write JSON (numpy values and tuples converted), atomically; returns its URI."""
        return self.write_text(rel_path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")

    def read_json(self, rel_path: str) -> Any | None:
        text = self.read_text(rel_path)
        return None if text is None else json.loads(text)

    def report_uri(self, stage: str) -> str:
        return self.path("reports", f"{_check_stage(stage)}.json")

    def write_report(self, stage: str, report: dict[str, Any]) -> str:
        """Write ``reports/<stage>.json`` atomically; returns its URI."""
        return self.write_json(f"reports/{_check_stage(stage)}.json", report)

    def read_report(self, stage: str) -> dict[str, Any] | None:
        """The stage's report, or None if the stage has not written one."""
        data = self.read_json(f"reports/{_check_stage(stage)}.json")
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{self.report_uri(stage)} does not hold a JSON object")
        return data


def _check_stage(stage: str) -> str:
    if not _STAGE_NAME.match(stage):
        raise ValueError(f"invalid stage name {stage!r}: use letters, digits, '_', '-', '.', '+'")
    return stage
