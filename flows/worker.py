"""``make worker``: a Prefect process worker that stops cleanly on Ctrl-C.

A terminal's Ctrl-C signals its whole foreground process group: make, the recipe's shell, the worker and the
flow runs the worker started. Prefect's worker forwards its first SIGINT to itself and answers any later one with
SIGKILL, so a second signal reaching it (from the group, or a second Ctrl-C while it winds down) kills it hard.
Here the worker runs in a session of its own, out of the terminal's group; this process takes the Ctrl-C, hands
the worker exactly one SIGINT, ignores further ones and waits for it to exit. (A shell's ``cmd &`` would not do:
without job control its background commands ignore SIGINT, and the worker would never hear the one we send.)

The Prefect API's database can be away: not up yet when a worker machine boots, or restarting while workers
poll. Prefect's worker answers that with tracebacks and, after about a minute of failed polls, exits. So the
launcher asks the API's readiness check (``/api/ready``, which queries the database) first, prints one line and
waits while it fails, and starts the worker once it answers. While the worker runs, a watchdog asks the same
check every few seconds; on an outage it prints one line and pauses the worker process (SIGSTOP: its flow runs,
separate processes, go on), and on recovery it prints one line and resumes it, so the worker neither floods
its log nor gives up, and polls again as soon as the database is back.

A worker machine can die mid-run. The launcher turns on flow-run heartbeats for the runs its worker starts and
creates the server's automation that marks a run Crashed once its heartbeats stop (see ``flows.heartbeats``).

Usage: ``python -m flows.worker --pool cpu [more prefect worker start options]``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from flows.heartbeats import AUTOMATION_NAME, ensure_heartbeat_automation, window_s, with_heartbeats

WATCH_INTERVAL_S = float(os.environ.get("NERSEMBLE_WORKER_WATCH_S", "2"))


def worker_command(args: list[str]) -> list[str]:
    """``prefect worker start --type process <args>``, with the prefect beside this interpreter."""
    prefect = Path(sys.executable).parent / "prefect"
    start = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    return [*start, "worker", "start", "--type", "process", *args]


def api_url() -> str | None:
    """The API the worker will poll: ``PREFECT_API_URL`` (env or profile); None for none configured."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    try:
        from prefect.settings import PREFECT_API_URL

        return PREFECT_API_URL.value() or None
    except Exception:  # noqa: BLE001 - no profile: the worker will say so itself
        return None


def readiness(url: str, timeout: float = 5.0) -> str | None:
    """None when the API and its database answer; else why not, in a few words."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/ready", timeout=timeout):
            return None
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:200]
        return f"database unreachable (HTTP {error.code}: {detail})" if error.code == 503 else f"HTTP {error.code}"
    except OSError as error:
        reason = getattr(error, "reason", error)
        return f"API unreachable ({reason})"


def wait_until_ready(url: str, stopped: Callable[[], bool], say: Callable[[str], None] = print,
                     interval: float = WATCH_INTERVAL_S) -> bool:
    """Block until the API is ready (one line while it is not); False when told to stop meanwhile."""
    problem = readiness(url)
    if problem is None:
        return True
    say(f"Prefect API at {url} not ready: {problem}; the worker starts when it is (retrying every {interval:g} s)")
    while not stopped():
        time.sleep(interval)
        if readiness(url) is None:
            say(f"Prefect API at {url} ready: starting the worker")
            return True
    return False


class Watchdog(threading.Thread):
    """Pauses the worker while the API's database is unreachable and resumes it when it is back."""

    def __init__(self, url: str, worker: subprocess.Popen, say: Callable[[str], None] = print,
                 interval: float = WATCH_INTERVAL_S):
        super().__init__(name="api-watchdog", daemon=True)
        self.url, self.worker, self.say, self.interval = url, worker, say, interval
        self.paused = False
        self.done = threading.Event()
        self.lock = threading.Lock()  # a stop never races a pause: the worker must hear its SIGINT

    def run(self) -> None:
        while not self.done.wait(self.interval) and self.worker.poll() is None:
            problem = readiness(self.url)
            with self.lock:
                if not self.done.is_set():
                    self._react(problem)

    def _react(self, problem: str | None) -> None:
        if problem is not None and not self.paused:
            self.say(f"Prefect API at {self.url} not ready: {problem}; worker paused until it is back "
                     f"(its flow runs go on)")
            self._signal(signal.SIGSTOP)
            self.paused = True
        elif problem is None and self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False
            self.say(f"Prefect API at {self.url} ready again: worker polling")

    def stop(self) -> None:
        """Stop watching; a paused worker is resumed so it can hear the stop signal."""
        with self.lock:
            self.done.set()
            if self.paused:
                self._signal(signal.SIGCONT)
                self.paused = False

    def _signal(self, signum: int) -> None:
        try:
            os.kill(self.worker.pid, signum)
        except ProcessLookupError:
            pass


def ensure_crash_detection(say: Callable[[str], None] = print) -> None:
    """Create the server's automation that marks runs without heartbeats Crashed, if missing (flows.heartbeats).

    Here rather than only in ``make deploy`` so that any server our workers poll has it; a failure is one line
    and the worker starts anyway: crash detection is worth having, not worth refusing work for.
    """
    try:
        if ensure_heartbeat_automation():
            say(f"created the automation {AUTOMATION_NAME!r}: flow runs without a heartbeat for "
                f"{window_s():g} s end Crashed")
    except Exception as error:  # noqa: BLE001 - one clear line, not a traceback
        say(f"could not create the automation {AUTOMATION_NAME!r} ({error}); a dead worker's runs will stay "
            f"Running until it exists (make deploy creates it)")


def run_worker(args: list[str]) -> int:
    """Run the worker until it exits; the first SIGINT or SIGTERM here becomes one SIGINT to it."""
    url = api_url()
    stopping = False
    worker: subprocess.Popen | None = None
    watchdog: Watchdog | None = None

    def early_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, early_stop)
    signal.signal(signal.SIGTERM, early_stop)
    if url and not wait_until_ready(url, lambda: stopping, say=_say):
        return 0
    if url:
        ensure_crash_detection(say=_say)
    # Its flow runs inherit its environment: heartbeats on, so a run whose machine dies ends Crashed.
    worker = subprocess.Popen(worker_command(args), start_new_session=True, env=with_heartbeats(dict(os.environ)))

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        # One signal is a graceful stop; a second one would be Prefect's SIGKILL. Later ones are ignored by the
        # kernel, not by this handler: on its way out the interpreter puts the default disposition back in
        # place of Python handlers, and a second Ctrl-C arriving then would kill this process with SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if watchdog is not None:
            watchdog.stop()
        print(f"\nstopping the worker (PID {worker.pid}); it exits once it has stopped polling", flush=True)
        try:
            os.kill(worker.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if stopping:  # a signal that came while the worker was being started
        stop(signal.SIGINT, None)
    elif url:
        watchdog = Watchdog(url, worker, say=_say)
        watchdog.start()
    code = worker.wait()
    if watchdog is not None:
        watchdog.stop()
    return 0 if stopping and code in (0, -signal.SIGINT, 130) else code


def _say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1:]))
