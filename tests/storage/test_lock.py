"""The per-sequence lock as one contract that every backend honours, plus what only one backend does.

``sequence_lock`` has two mechanisms: a kernel lock (``flock``) on local paths, and an exclusively created
lock file on other fsspec filesystems. :class:`LockContract` holds the behaviours every backend must show in
one process (threads stand in for other writers); :class:`CrossProcessLockContract` adds those that need a
second process, for the backends a second process can see. The subclasses at the bottom run the contract:

- ``TestLocalLock``: a local path (``flock``), across real processes;
- ``TestLockFileOnLocalDisk``: the lock-file mechanism that object stores use, on a local folder so that real
  processes can share it (a ``memory://`` filesystem lives in one process);
- ``TestMemoryLock``: ``memory://``, the fsspec path end to end through ``sequence_lock``.

Every work folder exists before it is locked: only ingest, which makes the sequence folder, locks with
``create=True``; on every backend a missing folder is refused by name and never created.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest

from storage import SequenceLockedError, SequenceWorkDir, StorageError, sequence_lock
from storage import uri as uris
from storage.lock import (
    DEFAULT_STALE_AFTER,
    LOCK_NAME,
    SequenceFolderMissingError,
    _fsspec_lock,
)

REPO = Path(__file__).resolve().parents[2]

# How a helper process takes the lock: argv[1] names the backend ("flock" or "lock-file"), argv[2] the
# work folder. The lock-file backend calls the mechanism object stores use, on a local folder.
ACQUIRE = textwrap.dedent(
    """
    import sys
    from storage.lock import _fsspec_lock, sequence_lock

    def acquire(timeout=0.0):
        if sys.argv[1] == "lock-file":
            return _fsspec_lock(sys.argv[2], timeout=timeout, poll=0.05, stale_after=3600.0)
        return sequence_lock(sys.argv[2], timeout=timeout)
    """
)

# Takes the lock, says so, then holds it until a line arrives on stdin (or for argv[3] seconds), then says
# it released.
HOLDER = ACQUIRE + textwrap.dedent(
    """
    import time
    with acquire():
        print("locked", flush=True)
        if len(sys.argv) > 3:
            time.sleep(float(sys.argv[3]))
        else:
            sys.stdin.readline()
    print("released", flush=True)
    """
)

# Tries the lock once without waiting and prints what happened.
PROBE = ACQUIRE + textwrap.dedent(
    """
    from storage.lock import SequenceLockedError
    try:
        with acquire():
            print("acquired")
    except SequenceLockedError as exc:
        print("locked:", exc)
    """
)


def lock_file_record(work: str) -> dict[str, Any] | None:
    """The holder record in the work folder's lock file; None when there is no file or it is empty."""
    fs, path = uris.filesystem(uris.normalize(work))
    lock_file = f"{path.rstrip('/')}/{LOCK_NAME}"
    if not fs.exists(lock_file):
        return None
    raw = fs.cat_file(lock_file)
    return json.loads(raw) if raw.strip() else None


def lock_file_exists(work: str) -> bool:
    fs, path = uris.filesystem(uris.normalize(work))
    return bool(fs.exists(f"{path.rstrip('/')}/{LOCK_NAME}"))


def existing_folder(work: str) -> str:
    """``work``, made to exist: a sequence folder is only ever locked once ingest has made it."""
    fs, path = uris.filesystem(uris.normalize(work))
    fs.makedirs(path, exist_ok=True)
    return work


def folder_exists(work: str) -> bool:
    fs, path = uris.filesystem(uris.normalize(work))
    return bool(fs.exists(path))


@contextmanager
def held_by_thread(acquire: Any, work: str, release_after: float | None = None) -> Iterator[threading.Event]:
    """Hold the lock in another thread until the yielded event is set (or ``release_after`` seconds pass)."""
    release, locked = threading.Event(), threading.Event()

    def hold() -> None:
        with acquire(work):
            locked.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert locked.wait(10), "the holder thread never got the lock"
        if release_after is not None:
            threading.Timer(release_after, release.set).start()
        yield release
    finally:
        release.set()
        thread.join(10)


class LockContract:
    """What every backend honours. Subclasses say where the work folder is and how the lock is taken."""

    def work_uri(self, tmp_path: Path) -> str:
        """Where a fresh work folder (a sequence's ``<work>/<PID>/<SEQ>``) goes on this backend."""
        raise NotImplementedError

    def acquire(self, work: str, *, timeout: float = 0.0, poll: float = 0.2,
                stale_after: float = DEFAULT_STALE_AFTER, create: bool = False) -> AbstractContextManager[None]:
        return sequence_lock(work, timeout=timeout, poll=poll, stale_after=stale_after, create=create)

    @pytest.fixture
    def work(self, tmp_path: Path) -> str:
        """An existing work folder."""
        return existing_folder(self.work_uri(tmp_path))

    def test_a_missing_sequence_folder_is_named_and_not_created(self, tmp_path: Path) -> None:
        work = self.work_uri(tmp_path / "no-such-work")
        with pytest.raises(SequenceFolderMissingError, match="no sequence folder at .*no-such-work/P001/SEQ_A"):
            with self.acquire(work):
                pytest.fail("locked a folder that does not exist")
        assert not folder_exists(work) and not lock_file_exists(work)
        with self.acquire(work, create=True):  # ingest makes the folder
            assert lock_file_exists(work)

    def test_a_missing_folder_is_a_storage_error_and_a_file_not_found_error(self, tmp_path: Path) -> None:
        with pytest.raises(StorageError) as info:
            with self.acquire(self.work_uri(tmp_path / "gone")):
                pass
        assert isinstance(info.value, FileNotFoundError) and "run `nersemble-pipeline ingest` first" in str(info.value)

    def test_holder_is_recorded_while_held_and_cleared_on_release(self, work: str) -> None:
        with self.acquire(work):
            holder = lock_file_record(work)
            assert holder is not None
            assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
            assert holder["since"].startswith("20") and holder["token"]
        assert lock_file_record(work) is None

    def test_second_acquire_fails_at_once_naming_the_sequence_and_holder(self, work: str) -> None:
        with self.acquire(work):
            start = time.monotonic()
            with pytest.raises(SequenceLockedError) as info:
                with self.acquire(work, timeout=0):
                    pytest.fail("got a lock that is already held")
            assert time.monotonic() - start < 1.0
        message = str(info.value)
        assert "P001/SEQ_A+1" in message
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert "since 20" in message  # an ISO timestamp
        assert LOCK_NAME in message and "wait" in message  # names the lock file and says what to do
        assert info.value.holder["pid"] == os.getpid()

    def test_waiting_acquire_gets_the_lock_when_the_holder_releases(self, work: str) -> None:
        with held_by_thread(self.acquire, work, release_after=0.5):
            start = time.monotonic()
            with self.acquire(work, timeout=10, poll=0.05):
                waited = time.monotonic() - start
        assert 0.2 < waited < 5

    def test_waiting_acquire_gives_up_after_timeout(self, work: str) -> None:
        with held_by_thread(self.acquire, work):
            start = time.monotonic()
            with pytest.raises(SequenceLockedError, match=f"pid {os.getpid()}"):
                with self.acquire(work, timeout=0.4, poll=0.05):
                    pass
            assert 0.35 < time.monotonic() - start < 3

    def test_second_acquire_in_same_process_does_not_hang(self, work: str) -> None:
        with self.acquire(work):
            with pytest.raises(SequenceLockedError):
                with self.acquire(work):
                    pass
            start = time.monotonic()
            with pytest.raises(SequenceLockedError):
                with self.acquire(work, timeout=0.2, poll=0.05):
                    pass
            assert time.monotonic() - start < 2
        with self.acquire(work, timeout=0):  # released cleanly, reusable
            pass

    def test_lock_is_released_when_the_body_raises(self, work: str) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            with self.acquire(work):
                raise RuntimeError("boom")
        with self.acquire(work, timeout=0):
            pass

    def test_threads_wait_for_each_other(self, work: str) -> None:
        inside = 0
        overlaps: list[int] = []
        guard = threading.Lock()

        def worker() -> None:
            nonlocal inside
            with self.acquire(work, timeout=10, poll=0.01):
                with guard:
                    inside += 1
                    overlaps.append(inside)
                time.sleep(0.05)
                with guard:
                    inside -= 1

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        assert overlaps == [1, 1, 1, 1]


class CrossProcessLockContract(LockContract):
    """What a backend that other processes can see honours across real processes."""

    backend: ClassVar[str]  # the name HOLDER and PROBE know it by

    @contextmanager
    def holder_process(self, work: str, hold_seconds: float | None = None) -> Iterator[subprocess.Popen[str]]:
        args = [sys.executable, "-c", HOLDER, self.backend, work]
        args += [str(hold_seconds)] if hold_seconds is not None else []
        proc = subprocess.Popen(
            args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "locked"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)

    def probe(self, work: str) -> str:
        """What another process gets when it tries the lock without waiting."""
        return subprocess.run(
            [sys.executable, "-c", PROBE, self.backend, work], cwd=REPO, capture_output=True, text=True,
            timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
        ).stdout

    @staticmethod
    def release(proc: subprocess.Popen[str]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"

    def test_second_process_fails_at_once_naming_the_holder(self, work: str) -> None:
        with self.holder_process(work) as proc:
            start = time.monotonic()
            with pytest.raises(SequenceLockedError) as info:
                with self.acquire(work, timeout=0):
                    pytest.fail("got a lock another process holds")
            assert time.monotonic() - start < 1.0
            message = str(info.value)
            assert "P001/SEQ_A+1" in message
            assert f"pid {proc.pid}" in message and socket.gethostname() in message
            assert "since 20" in message  # an ISO timestamp
            assert "wait" in message  # says what to do
            assert info.value.holder["pid"] == proc.pid
            self.release(proc)
            with self.acquire(work, timeout=0):
                pass

    def test_waiting_acquire_gets_the_lock_when_another_process_releases(self, work: str) -> None:
        with self.holder_process(work, hold_seconds=0.5):
            start = time.monotonic()
            with self.acquire(work, timeout=10, poll=0.05):
                waited = time.monotonic() - start
            assert 0.2 < waited < 5

    def test_waiting_acquire_gives_up_after_timeout_naming_the_other_process(self, work: str) -> None:
        with self.holder_process(work) as proc:
            start = time.monotonic()
            with pytest.raises(SequenceLockedError, match=f"pid {proc.pid}"):
                with self.acquire(work, timeout=0.4, poll=0.05):
                    pass
            assert 0.35 < time.monotonic() - start < 3

    def test_lock_dies_with_its_holder(self, work: str) -> None:
        with self.holder_process(work) as proc:
            proc.kill()
            proc.wait(timeout=10)
            with self.acquire(work, timeout=2, poll=0.05):
                pass

    def test_other_process_sees_our_lock(self, work: str) -> None:
        with self.acquire(work):
            out = self.probe(work)
            assert out.startswith("locked:") and f"pid {os.getpid()}" in out
            holder = lock_file_record(work)
            assert holder is not None and holder["pid"] == os.getpid()
        assert self.probe(work).strip() == "acquired"


class LockFileContract:
    """What the lock-file mechanism (every non-local filesystem) adds: the file goes, stale holders are broken."""

    def test_release_deletes_the_lock_file(self, work: str) -> None:
        with self.acquire(work):  # type: ignore[attr-defined]
            assert lock_file_exists(work)
        assert not lock_file_exists(work)

    def test_breaks_stale_and_dead_holders(self, work: str) -> None:
        fs, path = uris.filesystem(uris.normalize(work))
        fs.makedirs(path, exist_ok=True)
        lock_file = f"{path.rstrip('/')}/{LOCK_NAME}"
        old = {"host": "elsewhere", "pid": 1, "since": "2020-01-01T00:00:00Z", "since_epoch": time.time() - 100,
               "token": "x"}
        fs.pipe_file(lock_file, json.dumps(old).encode())
        with pytest.raises(SequenceLockedError, match="host elsewhere"):
            with self.acquire(work, stale_after=1000):  # type: ignore[attr-defined]
                pass
        with self.acquire(work, stale_after=50):  # type: ignore[attr-defined]  # 100 s old > 50 s: broken
            pass
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        gone = {**old, "host": socket.gethostname(), "pid": int(dead.stdout), "since_epoch": time.time()}
        fs.pipe_file(lock_file, json.dumps(gone).encode())
        with self.acquire(work):  # type: ignore[attr-defined]  # same host, holder pid no longer exists
            pass


# ---------------------------------------------------------------- the backends


class TestLocalLock(CrossProcessLockContract):
    """A local path: ``flock`` on ``<work>/.lock``, which the kernel drops when the holder dies."""

    backend = "flock"

    def work_uri(self, tmp_path: Path) -> str:
        return str(tmp_path / "P001" / "SEQ_A+1")

    def test_lock_file_stays_and_is_emptied_on_release(self, work: str) -> None:
        """A waiter may hold the file open, so it is never deleted; only its record is cleared."""
        with self.acquire(work):
            pass
        assert (Path(work) / LOCK_NAME).read_text() == ""

    def test_file_url_takes_the_same_lock(self, work: str) -> None:
        with self.acquire(work):
            with pytest.raises(SequenceLockedError, match="pass a lock timeout"):
                with self.acquire(f"file://{work}", timeout=0):
                    pass

    def test_work_dir_lock_is_this_lock(self, work: str) -> None:
        with SequenceWorkDir(work).lock():
            with pytest.raises(SequenceLockedError):
                with self.acquire(work, timeout=0):
                    pass


class TestLockFileOnLocalDisk(CrossProcessLockContract, LockFileContract):
    """The lock-file mechanism of object stores, run on a local folder so that real processes share it."""

    backend = "lock-file"

    def work_uri(self, tmp_path: Path) -> str:
        return str(tmp_path / "P001" / "SEQ_A+1")

    def acquire(self, work: str, *, timeout: float = 0.0, poll: float = 0.2,
                stale_after: float = DEFAULT_STALE_AFTER, create: bool = False) -> AbstractContextManager[None]:
        return _fsspec_lock(work, timeout=timeout, poll=poll, stale_after=stale_after, create=create)


class TestMemoryLock(LockContract, LockFileContract):
    """``memory://``: the fsspec path through ``sequence_lock``, in one process."""

    def work_uri(self, tmp_path: Path) -> str:
        return f"memory://test-lock-{uuid.uuid4().hex}/{tmp_path.name}/P001/SEQ_A+1"

    def test_message_names_the_file_to_delete_if_the_holder_is_dead(self, work: str) -> None:
        with self.acquire(work):
            with pytest.raises(SequenceLockedError) as info:
                with self.acquire(work, timeout=0):
                    pass
        assert f"delete {uris.join(uris.normalize(work), LOCK_NAME)}" in str(info.value)

    def test_work_dir_lock_is_this_lock(self, work: str) -> None:
        with SequenceWorkDir(work).lock():
            assert lock_file_record(work)["pid"] == os.getpid()  # type: ignore[index]
            with pytest.raises(SequenceLockedError):
                with self.acquire(work, timeout=0):
                    pass
        assert not lock_file_exists(work)
