"""The per-sequence lock, exercised across real processes."""

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
from contextlib import contextmanager
from pathlib import Path

import fsspec
import pytest

from storage import SequenceLockedError, SequenceWorkDir, sequence_lock
from storage.lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[2]

# Takes the lock, says so, then holds it until stdin closes or a line arrives (or for
# argv[2] seconds), then says it released.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from storage.lock import sequence_lock
    with sequence_lock(sys.argv[1]):
        print("locked", flush=True)
        if len(sys.argv) > 2:
            time.sleep(float(sys.argv[2]))
        else:
            sys.stdin.readline()
    print("released", flush=True)
    """
)


def _folder(path: Path) -> str:
    """An existing sequence folder: only ingest's lock creates one."""
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


@contextmanager
def holder_process(work_uri: str, hold_seconds: float | None = None) -> Iterator[subprocess.Popen[str]]:
    args = [sys.executable, "-c", HOLDER, work_uri] + ([str(hold_seconds)] if hold_seconds is not None else [])
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


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "released"


def test_second_process_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    work = _folder(tmp_path / "P001" / "SEQ_A+1")
    with holder_process(work) as proc:
        start = time.monotonic()
        with pytest.raises(SequenceLockedError) as info:
            with sequence_lock(work, timeout=0):
                pytest.fail("got a lock another process holds")
        assert time.monotonic() - start < 1.0
        message = str(info.value)
        assert "P001/SEQ_A+1" in message
        assert f"pid {proc.pid}" in message and socket.gethostname() in message
        assert "since 20" in message  # an ISO timestamp
        assert "wait" in message  # says what to do
        assert info.value.holder["pid"] == proc.pid
        _release(proc)
        with sequence_lock(work, timeout=0):
            pass


def test_waiting_acquire_gets_the_lock_when_the_holder_releases(tmp_path: Path) -> None:
    work = _folder(tmp_path / "P" / "S")
    with holder_process(work, hold_seconds=0.5):
        start = time.monotonic()
        with sequence_lock(work, timeout=10, poll=0.05):
            waited = time.monotonic() - start
        assert 0.2 < waited < 5


def test_waiting_acquire_gives_up_after_timeout(tmp_path: Path) -> None:
    work = _folder(tmp_path / "P" / "S")
    with holder_process(work) as proc:
        start = time.monotonic()
        with pytest.raises(SequenceLockedError, match=f"pid {proc.pid}"):
            with sequence_lock(work, timeout=0.4, poll=0.05):
                pass
        assert 0.35 < time.monotonic() - start < 3


def test_lock_dies_with_its_holder(tmp_path: Path) -> None:
    work = _folder(tmp_path / "P" / "S")
    with holder_process(work) as proc:
        proc.kill()
        proc.wait(timeout=10)
        with sequence_lock(work, timeout=2, poll=0.05):
            pass


def test_other_process_sees_our_lock(tmp_path: Path) -> None:
    work = _folder(tmp_path / "P" / "S")
    code = textwrap.dedent(
        """
        import sys
        from storage.lock import sequence_lock, SequenceLockedError
        try:
            with sequence_lock(sys.argv[1], timeout=0):
                print("acquired")
        except SequenceLockedError as exc:
            print("locked:", exc)
        """
    )
    with sequence_lock(work):
        out = subprocess.run(
            [sys.executable, "-c", code, work], cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        ).stdout
        assert out.startswith("locked:") and f"pid {os.getpid()}" in out
        holder = json.loads((Path(work) / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()


def test_second_acquire_in_same_process_does_not_hang(tmp_path: Path) -> None:
    work = _folder(tmp_path / "P" / "S")
    with sequence_lock(work):
        with pytest.raises(SequenceLockedError):
            with sequence_lock(work):
                pass
        start = time.monotonic()
        with pytest.raises(SequenceLockedError):
            with sequence_lock(work, timeout=0.2, poll=0.05):
                pass
        assert time.monotonic() - start < 2
    with sequence_lock(work):  # released cleanly, reusable
        pass


def test_lock_is_released_when_the_body_raises(tmp_path: Path) -> None:
    work = _folder(tmp_path / "P" / "S")
    with pytest.raises(RuntimeError, match="boom"):
        with sequence_lock(work):
            raise RuntimeError("boom")
    with sequence_lock(work):
        pass


def test_threads_wait_for_each_other(tmp_path: Path) -> None:
    work = _folder(tmp_path / "P" / "S")
    inside = 0
    overlaps: list[int] = []
    guard = threading.Lock()

    def worker() -> None:
        nonlocal inside
        with sequence_lock(work, timeout=10, poll=0.01):
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


# ---------------------------------------------------------------- non-local filesystems


def _memory_work() -> str:
    return f"memory://test-lock-{uuid.uuid4().hex}/P/S"


def test_fsspec_lock_excludes_and_releases() -> None:
    work = _memory_work()
    fs, path = fsspec.core.url_to_fs(work)
    with sequence_lock(work):
        holder = json.loads(fs.cat_file(f"{path}/{LOCK_NAME}"))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(SequenceLockedError, match="P/S") as info:
            with sequence_lock(work, timeout=0.1, poll=0.02):
                pass
        assert f"pid {os.getpid()}" in str(info.value) and LOCK_NAME in str(info.value)
    assert not fs.exists(f"{path}/{LOCK_NAME}")
    with SequenceWorkDir(work).lock():
        pass


def test_fsspec_lock_waits_for_release() -> None:
    work = _memory_work()
    released = threading.Event()

    def hold() -> None:
        with sequence_lock(work):
            released.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    fs, path = fsspec.core.url_to_fs(work)
    deadline = time.monotonic() + 5
    while not fs.exists(f"{path}/{LOCK_NAME}") and time.monotonic() < deadline:
        time.sleep(0.01)
    threading.Timer(0.3, released.set).start()
    with sequence_lock(work, timeout=5, poll=0.02):
        pass
    holder.join(5)


def test_fsspec_lock_breaks_stale_and_dead_holders() -> None:
    work = _memory_work()
    fs, path = fsspec.core.url_to_fs(work)
    lock_file = f"{path}/{LOCK_NAME}"
    old = {"host": "elsewhere", "pid": 1, "since": "2020-01-01T00:00:00Z", "since_epoch": time.time() - 100, "token": "x"}
    fs.pipe_file(lock_file, json.dumps(old).encode())
    with pytest.raises(SequenceLockedError, match="host elsewhere"):
        with sequence_lock(work, stale_after=1000):
            pass
    with sequence_lock(work, stale_after=50):  # 100 s old > 50 s: broken
        pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = {**old, "host": socket.gethostname(), "pid": int(dead.stdout), "since_epoch": time.time()}
    fs.pipe_file(lock_file, json.dumps(gone).encode())
    with sequence_lock(work):  # same host, holder pid no longer exists
        pass


def test_exclusive_create_lock_across_processes(tmp_path: Path) -> None:
    """The object-store code path (exclusive create), run on a local filesystem by two processes."""
    work = _folder(tmp_path / "P" / "S")
    code = textwrap.dedent(
        """
        import sys
        from storage.lock import _fsspec_lock, SequenceLockedError
        try:
            with _fsspec_lock(sys.argv[1], timeout=0, poll=0.05, stale_after=3600):
                print("acquired")
        except SequenceLockedError as exc:
            print("locked:", exc)
        """
    )
    from storage.lock import _fsspec_lock

    def other() -> str:
        return subprocess.run(
            [sys.executable, "-c", code, work], cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        ).stdout

    with _fsspec_lock(work, timeout=0, poll=0.05, stale_after=3600):
        out = other()
        assert out.startswith("locked:") and f"pid {os.getpid()}" in out
    assert other().strip() == "acquired"


def test_a_missing_sequence_folder_is_named_and_not_created(tmp_path: Path) -> None:
    from storage.lock import SequenceFolderMissingError

    work = tmp_path / "no-such-work" / "P" / "S"
    with pytest.raises(SequenceFolderMissingError, match="no sequence folder at .*no-such-work/P/S"):
        with sequence_lock(str(work)):
            pass
    assert not (tmp_path / "no-such-work").exists()
    with sequence_lock(str(work), create=True):  # ingest makes the folder
        assert (work / LOCK_NAME).exists()
