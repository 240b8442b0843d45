"""One writer per sequence.

Two processes writing the same capture store would interleave stage records and, worse, the
read-modify-write of a zarr chunk. Every flow run therefore holds ``sequence_lock(work_uri)``
for as long as it writes. On a local disk the lock is ``fcntl.flock`` on ``<work_uri>/.lock``:
the kernel drops it when the holder dies, so a crashed run never blocks the next one. On other
fsspec filesystems (memory://, s3://) there is no such lock, so we create the lock file
exclusively and treat it as stale after ``stale_after`` seconds or when its holder process is
gone (same host only).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import IO, Any

from storage import uri as uris
from storage.errors import StorageError

LOCK_NAME = ".lock"
DEFAULT_STALE_AFTER = 24 * 3600.0


class SequenceFolderMissingError(StorageError, FileNotFoundError):
    """The sequence folder a stage was pointed at does not exist (only ingest creates one)."""

    def __init__(self, work_uri: str):
        super().__init__(
            errno.ENOENT,
            f"no sequence folder at {work_uri}: check the path, or run `nersemble-pipeline ingest` first "
            f"(it creates <work>/<PID>/<SEQ>)",
            work_uri,
        )

    def __str__(self) -> str:  # the message already names the folder
        return str(self.strerror)


class SequenceLockedError(StorageError, RuntimeError):
    """Another process holds this sequence's lock."""

    def __init__(self, work_uri: str, holder: dict[str, Any] | None, waited: float):
        self.work_uri = work_uri
        self.holder = holder or {}
        self.waited = waited
        sequence = "/".join(work_uri.rstrip("/").split("/")[-2:])
        if self.holder:
            who = (
                f"host {self.holder.get('host', '?')}, pid {self.holder.get('pid', '?')}, "
                f"since {self.holder.get('since', '?')}"
            )
        else:
            who = "an unknown holder (it has not written its details yet)"
        lock_file = uris.join(work_uri, LOCK_NAME)
        hint = (
            "wait for that run to finish, or pass a lock timeout to wait for it"
            if uris.is_local(work_uri)
            else f"wait for that run to finish; if it is dead, delete {lock_file}"
        )
        super().__init__(
            f"sequence {sequence} is being written by another process ({who}); "
            f"waited {waited:.1f}s for {lock_file}: {hint}"
        )


def _holder_info(token: str) -> dict[str, Any]:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "since": datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "since_epoch": now,
        "token": token,
    }


def _parse_holder(raw: bytes | str) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def sequence_lock(
    work_uri: str,
    *,
    timeout: float = 0.0,
    poll: float = 0.2,
    stale_after: float = DEFAULT_STALE_AFTER,
    create: bool = False,
    lock_name: str = LOCK_NAME,
) -> Iterator[None]:
    """Hold the sequence's write lock for the ``with`` block.

    Only a stage that makes the sequence folder (ingest) passes ``create=True``; for every other stage a
    missing folder is a wrong path, so :class:`SequenceFolderMissingError` names it instead of the lock
    quietly creating ``<work>/<PID>/<SEQ>/.lock`` there (on every backend: an object store's "folder" is the
    prefix its objects share, so a sequence folder with nothing in it is missing there too).

    ``timeout=0`` fails at once with :class:`SequenceLockedError`; a positive ``timeout`` waits
    up to that many seconds. Not re-entrant: a second acquire in the same process behaves like
    one from another process (fails at once or after ``timeout``), it never hangs.
    ``stale_after`` only applies to non-local filesystems. ``lock_name`` names another lock file in the same
    folder: the archive flow's claim on a sequence (held while a sequence run it started goes on) is separate
    from the writers' lock, which that sequence run's stages take themselves.
    """
    work_uri = uris.normalize(work_uri)
    if uris.is_local(work_uri):
        with _local_lock(work_uri, timeout=timeout, poll=poll, create=create, lock_name=lock_name):
            yield
    else:
        with _fsspec_lock(work_uri, timeout=timeout, poll=poll, stale_after=stale_after, create=create,
                          lock_name=lock_name):
            yield


@contextmanager
def _local_lock(work_uri: str, *, timeout: float, poll: float, create: bool = False,
                lock_name: str = LOCK_NAME) -> Iterator[None]:
    import fcntl

    if create:
        os.makedirs(work_uri, exist_ok=True)
    elif not os.path.isdir(work_uri):
        raise SequenceFolderMissingError(work_uri)
    path = os.path.join(work_uri, lock_name)
    fh: IO[str] = open(path, "a+", encoding="utf-8")
    start = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            waited = time.monotonic() - start
            if waited >= timeout:
                fh.seek(0)
                raise SequenceLockedError(work_uri, _parse_holder(fh.read()), waited)
            time.sleep(max(0.0, min(poll, timeout - waited)))
        # The file is never deleted (a waiter may hold it open); we only rewrite its contents.
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(_holder_info(uuid.uuid4().hex)))
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


@contextmanager
def _fsspec_lock(work_uri: str, *, timeout: float, poll: float, stale_after: float,
                 create: bool = False, lock_name: str = LOCK_NAME) -> Iterator[None]:
    fs, base = uris.filesystem(work_uri)
    if create:
        fs.makedirs(base, exist_ok=True)
    elif not fs.isdir(base):
        raise SequenceFolderMissingError(work_uri)
    path = f"{base.rstrip('/')}/{lock_name}"
    token = uuid.uuid4().hex
    payload = json.dumps(_holder_info(token)).encode()
    start = time.monotonic()
    while True:
        if _try_create(fs, path, payload, token):
            break
        holder = _read_holder(fs, path)
        if _is_stale(holder, stale_after):
            _remove_if(fs, path, holder.get("token") if holder else None)
            continue
        waited = time.monotonic() - start
        if waited >= timeout:
            raise SequenceLockedError(work_uri, holder, waited)
        time.sleep(max(0.0, min(poll, timeout - waited)))
    try:
        yield
    finally:
        _remove_if(fs, path, token)


def _try_create(fs: Any, path: str, payload: bytes, token: str) -> bool:
    """Exclusive create; filesystems without ``xb`` fall back to create-then-verify."""
    try:
        with fs.open(path, "xb") as f:
            f.write(payload)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError):
        if fs.exists(path):
            return False
        fs.pipe_file(path, payload)
        holder = _read_holder(fs, path)
        return bool(holder and holder.get("token") == token)


def _read_holder(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        return _parse_holder(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _is_stale(holder: dict[str, Any] | None, stale_after: float) -> bool:
    if holder is None:
        return False  # vanished or half-written: retry rather than break someone's fresh lock
    if time.time() - float(holder.get("since_epoch", 0.0)) > stale_after:
        return True
    same_host = holder.get("host") == socket.gethostname()
    pid = holder.get("pid")
    return same_host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid)


def _remove_if(fs: Any, path: str, token: str | None) -> None:
    """Delete the lock file only if it still carries ``token`` (never someone else's new lock)."""
    holder = _read_holder(fs, path)
    if holder is not None and holder.get("token") == token:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
