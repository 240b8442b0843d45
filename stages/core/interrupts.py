"""Stop long work cleanly on Ctrl-C (SIGINT) and SIGTERM: finish the step, checkpoint, then stop.

Prefect cancels a flow run by sending SIGTERM to its process (the runner or worker does; a plain ``kill`` does
the same), and a terminal's Ctrl-C sends SIGINT. Python's default reactions (KeyboardInterrupt, or death)
would drop everything trained since the last checkpoint. :func:`stop_on_signals` installs handlers that only
*request* a stop; the training loop checks the request after each step, writes a checkpoint and returns, and
the stage raises :class:`TrainingInterrupted` (exit status 128 + signal, the shell's convention).

Signal handlers can only be installed from the main thread. Where training runs in a worker thread (a Prefect
task runner), whoever runs the main thread wraps its fan-out in :func:`forward_stop_signals`: its handler sets a
process-wide stop request that every worker's :class:`StopRequest` sees, then calls the handler it replaced
(Prefect's, which ends the flow run; its thread pool then waits for the worker, which checkpoints and returns).
As a last resort a worker's request also counts as set once the main thread has finished. The previous
handlers come back when each ``with`` block ends, so a stop request never outlives the work it guards.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from stages.core.errors import PipelineError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(PipelineError):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    def __reduce__(self):  # noqa: ANN204 - keeps the signal when the exception is pickled into a result
        return type(self), (str(self), self.signum)


_PROCESS_STOP: dict[str, int] = {}  # "signum" once a forwarded signal asked every worker to stop


class StopRequest:
    """True once a stop was asked for: by a signal, by :meth:`set`, or by the end of the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._event = threading.Event()
        self._main = threading.main_thread()
        self._in_worker = threading.current_thread() is not self._main

    def set(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = int(signum)
        self._event.set()

    def __call__(self) -> bool:
        if not self._event.is_set() and "signum" in _PROCESS_STOP:
            self.set(_PROCESS_STOP["signum"])  # the main thread received a signal and forwarded it
        if not self._event.is_set() and self._in_worker and not self._main.is_alive():
            self.set(signal.SIGTERM)  # the process is ending around us
        return self._event.is_set()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM set the yielded :class:`StopRequest` instead of ending the process.

    A second SIGINT while the stop is pending raises KeyboardInterrupt at once (a user who presses Ctrl-C twice
    wants out now). Outside the main thread nothing is installed (Python forbids it); see the module doc.
    """
    request = StopRequest()
    previous: dict[int, object] = {}

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001 - the signal module's signature
        if request() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.set(signum)

    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)  # type: ignore[arg-type]


@contextmanager
def forward_stop_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """In the main thread: on SIGINT/SIGTERM ask every worker thread's training to stop, then run the old handler.

    Wrap a fan-out of work to threads (a Prefect task runner) in it; outside the main thread it does nothing.
    """
    previous: dict[int, object] = {}

    def handler(signum: int, frame: object) -> None:
        _PROCESS_STOP.setdefault("signum", int(signum))
        old = previous.get(signum)
        if callable(old):
            old(signum, frame)
        elif old == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    if threading.current_thread() is threading.main_thread():
        for signum in signals:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        if previous:
            _PROCESS_STOP.clear()
