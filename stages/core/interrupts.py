"""Stop long work cleanly on Ctrl-C (SIGINT) and SIGTERM: finish the step, checkpoint, then stop.

Prefect cancels a flow run by sending SIGTERM to its process (the runner or worker does; a plain ``kill`` does
the same), and a terminal's Ctrl-C sends SIGINT. Python's default reactions (KeyboardInterrupt, or death)
would drop everything trained since the last checkpoint. :func:`stop_on_signals` installs handlers that only
*request* a stop; the training loop checks the request after each step, writes a checkpoint and returns, and
the stage raises :class:`TrainingInterrupted` (exit status 128 + signal, the shell's convention).

Signal handlers can only be installed from the main thread. Where training runs in a worker thread (a Prefect
task runner), the main thread keeps its own handler (Prefect's raises in the main thread, which ends the flow
run); the request then also counts as set once the main thread has finished, since an interpreter that is
shutting down would otherwise wait for the whole training to end. The previous handlers come back when the
``with`` block ends, so the stop request never outlives the training it guards.
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
        if not self._event.is_set() and self._in_worker and not self._main.is_alive():
            self.set(signal.SIGTERM)  # the process is ending around us (e.g. Prefect handled the signal)
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
