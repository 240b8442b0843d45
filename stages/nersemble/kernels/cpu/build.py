"""Building the CPU fast path's C kernels (``kernels.c`` beside this file) on first use, and caching them.

On a CPU a preview step runs a few thousand samples through ~150 small ops and a render a few million;
either way most of the time goes to writing intermediates ([L, N, 8] int64 corner indices, [L, N, K*F]
interpolated rows) to memory and reading them back, not to arithmetic. The kernels compute per sample with
nothing of that size in memory; :mod:`.ops` wraps them as tensor ops.

Which path runs: ``NERSEMBLE_FAST=0`` forces the eager torch reference everywhere; otherwise float32 CPU
tensors take the kernels when they build. No C compiler, or a build that fails: one warning line naming
the fallback, then the reference path, never a crash. Builds are cached under ``NERSEMBLE_CACHE`` (default
``~/.cache/nersemble``) in a folder named by a hash of the source, the compiler, the flags, the CPU and
the torch version, so a stale build is rebuilt, never loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = (Path(__file__).with_name("kernels.c")).read_text()

ENV = "NERSEMBLE_FAST"  # "0"/"false"/"off": the eager reference path
CACHE_ENV = "NERSEMBLE_CACHE"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
MAX_WIDTH = 256  # K*F columns the kernels' stack buffers hold (MAXW in the source)
MAX_LEVELS = 32  # levels the kernels' stack buffers hold (MAXL in the source)
MAX_FREQUENCIES = 16  # posenc frequencies the kernel's buffers hold (MAXF in the source)

_state: dict[str, object] = {"lib": None, "failed": None, "warned": False}


def requested() -> bool:
    """The fast path is wanted: ``NERSEMBLE_FAST`` unset, or anything but 0/false/no/off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def compiler() -> str | None:
    """The C compiler to build with: ``CC``, else cc/gcc/clang on PATH."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _warn_once(reason: str) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"nersemble fast path unavailable ({reason}); falling back to the torch reference path",
                      RuntimeWarning, stacklevel=4)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor()


def build_key(cc: str) -> str:
    """Hash of everything a build depends on: a change in any of them gives a new cache folder."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    parts = [SOURCE, " ".join(FLAGS), version, torch.__version__, platform.machine(), _cpu_name()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nersemble")


def _build(cc: str, target: Path) -> None:
    """Compile into a temporary file beside ``target`` and rename it into place (safe with parallel builds)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, out = Path(tmp) / "kernels.c", Path(tmp) / target.name
        src.write_text(SOURCE)
        result = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(result.stderr or result.stdout).strip().splitlines()[:1]}")
        os.replace(out, target)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.hash_forward.argtypes = [p, p, p, i64, i32, i32, i32, p, p, p, p, i32, p, i32]
    lib.hash_forward.restype = None
    lib.hash_backward.argtypes = [p, p, p, p, i64, i32, i32, i32, p, p, p, p, i32, p, p, p, i32]
    lib.hash_backward.restype = None
    lib.warp_encode.argtypes = [p, p, p, i64, p, i32, p, i32, i32, i32, p, p, p, p, i32, p, p, p, i32]
    lib.warp_encode.restype = None
    lib.se3_warp.argtypes = [p, p, p, i64, ctypes.c_float, p, i32]
    lib.se3_warp.restype = None
    lib.se3_warp_backward.argtypes = [p, p, p, p, i64, ctypes.c_float, p, p, p, i32]
    lib.se3_warp_backward.restype = None
    lib.posenc.argtypes = [p, i64, p, i32, p, i32, p, i32]
    lib.posenc.restype = None
    lib.slab_take.argtypes = [i64, p, p, p, p, i64, p, p, p, p, p, p, p, p, p, p]
    lib.slab_take.restype = i64
    lib.slab_update.argtypes = [i64, p, p, p, p, p, p, p, ctypes.c_float, ctypes.c_double, p, p, p, p, p, p]
    lib.slab_update.restype = None
    lib.march.argtypes = [p, p, p, p, p, i64, ctypes.c_float, p, p, i32, i32, i32, i32, p, p, p, p, p, p, i32]
    lib.march.restype = None


def library() -> ctypes.CDLL | None:
    """The built kernels (building them on first use), or None with one warning when they cannot be had."""
    if _state["lib"] is not None or _state["failed"] is not None:
        return _state["lib"]  # type: ignore[return-value]
    cc = compiler()
    if cc is None:
        _state["failed"] = "no C compiler (cc, gcc or clang) on PATH"
        _warn_once(_state["failed"])
        return None
    target = cache_dir() / f"fast-{build_key(cc)}" / "libnersemble_fast.so"
    try:
        if not target.exists():
            _build(cc, target)
        try:
            lib = ctypes.CDLL(str(target))
        except OSError:  # a truncated or foreign file under the right name: rebuild it once
            _build(cc, target)
            lib = ctypes.CDLL(str(target))
        _declare(lib)
    except Exception as error:  # noqa: BLE001 - any build or load failure means: fall back
        _state["failed"] = f"building the kernels failed: {error}"
        _warn_once(str(_state["failed"])[:300])
        return None
    _state["lib"] = lib
    return lib


def available() -> bool:
    """The fast path is requested and its kernels are built (builds them if needed)."""
    return requested() and library() is not None


def applies(*tensors: torch.Tensor) -> bool:
    """Whether these tensors should take the fast path: float32 on the CPU, and the kernels are there."""
    if not requested():
        return False
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    return library() is not None
