"""Fixtures shared by the Triton tests, which run their kernels under Triton's CPU interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING
from pathlib import Path

import pytest

if TYPE_CHECKING:
    from stages.nersemble.model import NeRSembleModel


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


@pytest.fixture
def fast_kernels() -> None:
    """The fast path's C kernels are built: skip without a compiler, fail when one is present and the build failed."""
    from stages.nersemble.kernels.cpu import build as fast

    if fast.compiler() is None:
        pytest.skip("no C compiler on PATH: the fast path cannot be built here")
    if fast.library() is None:
        pytest.fail(f"a compiler is present but the kernels did not build: {fast._state['failed']}")


@pytest.fixture
def scaled_preview_model() -> Callable[..., "NeRSembleModel"]:
    """A 3-timestep preview model in a cube of half-size ``half``, its weights scaled up from the init (30x for
    the tables, 3x elsewhere) so every term of the chain matters and rays terminate inside the box."""
    import torch

    from stages.nersemble.config import preset
    from stages.nersemble.model import NeRSembleModel

    def build(half: float, **overrides) -> NeRSembleModel:
        torch.manual_seed(0)
        config = preset("preview").with_overrides(**overrides)
        box = torch.tensor([[-half] * 3, [half] * 3])
        model = NeRSembleModel(config, 3, box, backend="torch")
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(30.0 if p.numel() > 100_000 else 3.0)
        return model

    return build
