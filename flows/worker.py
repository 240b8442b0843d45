"""``make worker``: a Prefect process worker that stops cleanly on Ctrl-C.

A terminal's Ctrl-C signals its whole foreground process group: make, the recipe's shell, the worker and the
flow runs the worker started. Prefect's worker forwards its first SIGINT to itself and answers any later one with
SIGKILL, so a second signal reaching it (from the group, or a second Ctrl-C while it winds down) kills it hard.
Here the worker runs in a session of its own, out of the terminal's group; this process takes the Ctrl-C, hands
the worker exactly one SIGINT, ignores further ones and waits for it to exit. (A shell's ``cmd &`` would not do:
without job control its background commands ignore SIGINT, and the worker would never hear the one we send.)

Usage: ``python -m flows.worker --pool cpu [more prefect worker start options]``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def worker_command(args: list[str]) -> list[str]:
    """``prefect worker start --type process <args>``, with the prefect beside this interpreter."""
    prefect = Path(sys.executable).parent / "prefect"
    start = [str(prefect)] if prefect.exists() else [sys.executable, "-m", "prefect"]
    return [*start, "worker", "start", "--type", "process", *args]


def run_worker(args: list[str]) -> int:
    """Run the worker until it exits; the first SIGINT or SIGTERM here becomes one SIGINT to it."""
    worker = subprocess.Popen(worker_command(args), start_new_session=True)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        # One signal is a graceful stop; a second one would be Prefect's SIGKILL. Later ones are ignored by the
        # kernel, not by this handler: on its way out the interpreter puts the default disposition back in
        # place of Python handlers, and a second Ctrl-C arriving then would kill this process with SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\nstopping the worker (PID {worker.pid}); it exits once it has stopped polling", flush=True)
        try:
            os.kill(worker.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = worker.wait()
    return 0 if stopping and code in (0, -signal.SIGINT, 130) else code


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1:]))
