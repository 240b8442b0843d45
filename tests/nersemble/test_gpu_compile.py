"""The compile gate in the suite: every Triton kernel the model launches compiles for real NVIDIA targets.

Triton's interpreter, which runs the value tests on the CPU, accepts code the real compiler rejects; this runs
``benchmarks/gpu_compile.py`` (in a child process, since the interpreter may already own this one's triton),
which compiles each preset's launches, built by the model's own launch code, with the wheel's ptxas.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Only looked up, not imported: importing triton here (compiled) would keep the interpreter tests from switching
# it to the interpreter in this process.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed here (pip install triton; it is in the test extra)")

ROOT = Path(__file__).resolve().parents[2]
REQUIRED_TARGETS = {"sm_80", "sm_86", "sm_89", "sm_90"}
KERNELS = {"hash_ensemble_fwd", "hash_ensemble_bwd", "composite_fwd", "composite_bwd", "march_kernel"}


@pytest.mark.slow
def test_every_kernel_compiles_for_every_target(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_compile.py"), "--out", str(tmp_path),
                            "--workers", "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    result_file = tmp_path / "gpu_compile.json"
    assert result_file.exists(), child.stdout[-3000:] + child.stderr[-3000:]
    rows = json.loads(result_file.read_text())["rows"]
    failed = [f"{r['kernel']} ({r['preset']}, {r['variant']}) on {r['target']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert child.returncode == 0, child.stderr[-3000:]
    assert REQUIRED_TARGETS <= {r["target"] for r in rows}
    for preset in ("preview", "standard", "paper"):
        mine = [r for r in rows if r["preset"] == preset]
        assert {r["kernel"] for r in mine} == KERNELS
        # Both directions of the encoding, for the gradient sets training asks for.
        assert {r["variant"] for r in mine if r["kernel"] == "hash_ensemble_bwd"} == {"backward x+table",
                                                                                     "backward x+blend+table"}
    assert all(r["registers"] and r["registers"] <= 255 for r in rows)


def test_a_compiler_error_names_the_kernel_the_target_and_the_message(tmp_path):
    """What the gate caught in the hash kernels: a tl.constexpr name assigned inside tl.static_range."""
    script = """
import triton, triton.language as tl, torch
from stages.nersemble.kernels.cuda.compile import compile_launch
from stages.nersemble.kernels.cuda.launch import Launch

@triton.jit
def redefines(out, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in tl.static_range(2):
        D: tl.constexpr = c
        acc += D
    tl.store(out + tl.arange(0, BLOCK), acc)

result = compile_launch(Launch(redefines, (1,), (torch.empty(16, device="meta"),), {"BLOCK": 16}), 90)
print(result.ok, result.kernel, result.target)
print(result.error)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    path = tmp_path / "probe.py"  # triton.jit reads the kernel's source, so it must live in a real file
    path.write_text(script)
    child = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = child.stdout.splitlines()
    assert lines[0] == "False redefines sm_90", child.stdout + child.stderr[-2000:]
    assert "already defined" in lines[1] or "constexpr" in lines[1]
