"""Building the hash-ensemble encoding for a backend name: the model's side of the kernel registry."""

from __future__ import annotations

from ._reference import ReferenceHashEnsemble
from .config import HashEnsembleConfig
from .hash_encoding import Backend, HashEnsembleEncoding, TcnnHashEnsemble, TorchHashEnsemble, TritonHashEnsemble
from .kernels.registry import auto_backend, triton_importable


def make_encoding(config: HashEnsembleConfig, backend: Backend = "auto") -> HashEnsembleEncoding:
    """The ensemble encoding for ``backend``; ``auto`` picks ``tcnn``, else ``triton`` on CUDA, else ``torch``.

    ``triton`` builds without a GPU too (it runs the torch path on CPU tensors, and the tests run its kernels
    under ``TRITON_INTERPRET=1``); it fails only when triton does not import. Chosen by ``auto`` it falls back to
    the torch path when its kernels fail on first use; named explicitly it raises (``TritonHashEnsemble``).
    """
    chosen = auto_backend() if backend == "auto" else backend
    if chosen == "torch":
        return TorchHashEnsemble(config)
    if chosen == "triton":
        if not triton_importable():
            raise ImportError("hash-encoding backend 'triton': the triton package does not import here "
                              "(pip install triton, or a CUDA build of torch); use backend 'torch'")
        return TritonHashEnsemble(config, strict=backend != "auto")
    if chosen == "reference":
        return ReferenceHashEnsemble(config)
    if chosen == "tcnn":
        return TcnnHashEnsemble(config)
    raise ValueError(f"unknown hash-encoding backend {backend!r}")
