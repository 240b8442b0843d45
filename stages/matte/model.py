"""The saliency model behind the ``rembg`` and ``fused`` methods, loaded strictly offline.

rembg downloads a missing model the moment a session is created, and our machines must not (and mostly
cannot) reach the release page. So the model file is located first, the way rembg itself would look for
it, and a missing file is an error that says how to install it; ``rembg.new_session`` is only called once
the file is known to exist. ``import rembg`` is slow the first time (numba compiles pymatting), so it
happens only when a model is actually loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import PipelineError
from stages.matte.models import rembg_home

INSTALL_HINT = "run `make install` or `nersemble-pipeline install-models` (installs u2netp offline-safe)"
# rembg sessions that are not one local <name>.onnx file giving one subject mask: remote services (they would
# send frames off the machine), multi-file or prompt-driven models, garment segmentation, and the *_custom
# sessions, which take a file path instead of a name
UNSUITABLE_SESSIONS = frozenset({"atlascloud", "withoutbg", "sam", "u2net_cloth_seg", "u2net_custom", "dis_custom",
                                 "ben_custom"})


class ModelMissingError(PipelineError):
    """The saliency model's ONNX file is not where rembg would look for it."""


class ModelLoadError(PipelineError):
    """The model file exists but rembg or onnxruntime cannot use it."""


@dataclass(frozen=True)
class ModelSpec:
    """A located model: what rembg calls it and which file it will load."""

    name: str  # rembg session name, or "u2net_custom" for a file given by path
    path: Path

    def digest_parts(self) -> tuple[str, int, int]:
        """Identity of the file, for the stage's input digest: swapping the model re-runs matting."""
        stat = self.path.stat()
        return str(self.path), stat.st_size, stat.st_mtime_ns


def ensure_rembg_home() -> Path:
    """Point rembg at the project's models folder unless the user already chose one (U2NET_HOME)."""
    if not os.environ.get("U2NET_HOME"):
        os.environ["U2NET_HOME"] = str(rembg_home())
    return Path(os.environ["U2NET_HOME"]).expanduser()


def _is_path(model: str) -> bool:
    return model.endswith(".onnx") or os.sep in model or "/" in model


def candidate_paths(name: str, home: Path) -> list[Path]:
    """Where rembg looks for a named model, in its own order (per-model folder, then the flat legacy folder)."""
    return [home / "models" / name / f"{name}.onnx", home / f"{name}.onnx"]


def locate_model(model: str) -> ModelSpec:
    """Find the model file without touching the network; a missing file is a :class:`ModelMissingError`."""
    home = ensure_rembg_home()
    if _is_path(model):
        path = Path(model).expanduser().resolve()
        if not path.is_file():
            raise ModelMissingError(f"matting model file {path} does not exist; pass an existing .onnx file or a "
                                    f"model name, or {INSTALL_HINT}")
        return ModelSpec(name="u2net_custom", path=path)
    if model in UNSUITABLE_SESSIONS:
        raise ModelLoadError(f"rembg session {model!r} cannot be used for matting here; name a single-file "
                             "model such as u2netp, or pass the path to an .onnx file")
    for path in candidate_paths(model, home):
        if path.is_file():
            return ModelSpec(name=model, path=path)
    looked = ", ".join(str(p) for p in candidate_paths(model, home))
    raise ModelMissingError(f"matting model {model!r} is not installed (looked for {looked}); {INSTALL_HINT}. "
                            "Models are never downloaded at run time.")


def _session_options(threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    return options


CUDA_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "CPUExecutionProvider"


def choose_providers(device: str, available: list[str]) -> list[str]:
    """onnxruntime providers for ``--device auto|cpu|cuda``, given what this onnxruntime build offers.

    auto takes CUDA where the build has it (onnxruntime-gpu on a GPU worker); asking for CUDA without it is an
    error, not a silent fallback, as for the torch stages. CPU always comes last: ops CUDA lacks run there.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"matte --device {device!r}: choose auto, cpu or cuda")
    has_cuda = CUDA_PROVIDER in available
    if device == "cuda" and not has_cuda:
        raise PipelineError(f"matte --device cuda: this onnxruntime has no {CUDA_PROVIDER} (available: "
                            f"{', '.join(available) or 'none'}); install onnxruntime-gpu or use --device cpu or auto")
    return [CUDA_PROVIDER, CPU_PROVIDER] if device != "cpu" and has_cuda else [CPU_PROVIDER]


def session_providers(session: Any) -> list[str]:
    """The providers a session really got (a CUDA provider whose libraries are missing falls back to CPU)."""
    inner = getattr(session, "inner_session", None)
    return list(inner.get_providers()) if inner is not None else []


def load_session(spec: ModelSpec, threads: int, device: str = "auto") -> Any:
    """A rembg session for an already-located model file; shared by the camera workers (ORT runs are thread-safe)."""
    ensure_rembg_home()
    import onnxruntime as ort
    import rembg

    options = _session_options(threads)
    providers = choose_providers(device, list(ort.get_available_providers()))
    try:
        if spec.name == "u2net_custom":
            return _file_session_class()(spec.name, options, model_path=str(spec.path), providers=providers)
        return rembg.new_session(spec.name, sess_opts=options, providers=providers)
    except Exception as error:  # onnxruntime and rembg raise plain exceptions for unusable files
        raise ModelLoadError(f"matting model {spec.path} could not be loaded by rembg ({spec.name}): "
                             f"{error}") from error


def _file_session_class() -> type:
    """Built on first use, so importing this module does not import rembg."""
    from rembg.sessions.u2net_custom import U2netCustomSession

    class FileSession(U2netCustomSession):
        """rembg's custom U2-Net session, for a file anywhere on disk (rembg only allows its own folder)."""

        @classmethod
        def download_models(cls, *args: Any, **kwargs: Any) -> str:
            return str(kwargs["model_path"])

    return FileSession


def saliency(session: Any, frame: np.ndarray) -> np.ndarray:
    """The model's foreground probability for one (H, W, 3) uint8 frame, (H, W) float32 in [0, 1]."""
    from PIL import Image

    mask = session.predict(Image.fromarray(frame))[0]
    return np.asarray(mask, dtype=np.float32) * np.float32(1.0 / 255.0)
