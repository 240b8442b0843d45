"""Fixtures shared by the Triton tests, which run their kernels under Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def rerun_under_interpreter() -> Callable[[str], None]:
    """Run a test file again in a child process with ``TRITON_INTERPRET=1``.

    The interpreter can only be switched on before triton is first imported; where an earlier test imported it
    compiled, a Triton test file skips its tests here and has them run in a fresh process instead.
    """
    root = Path(__file__).resolve().parents[2]

    def run(test_file: str) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                               cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]

    return run
