"""The checkpoint format: what a trained model's file holds, how it is sealed, and how it is read back.

A module of its own so that whatever reads a trained model (export, evaluate, the viewer, through
``stages/rendering``) depends on the format and the model only, never on the training loop.

Checkpoints hold plain tensors, numbers and strings only, so they load with ``torch.load(weights_only=True)``.
Each file ends with a SHA-256 of everything before it, written last: a file cut short or with flipped bytes
(tensor data or header) fails :func:`load_checkpoint` with :class:`CheckpointError` naming the file, before torch
reads a byte of it, so a damaged checkpoint is never trained on or rendered from.

Checkpoints written before the hash existed end without it. Such a file still loads when torch reads it whole
(a file cut short does not: the zip directory torch needs sits at its end), with a warning that it was not
verified: refusing it would force retraining every existing model. A file whose own contents say it was written
with a hash (``content_hash`` in the dict) but that has lost its trailer is cut short, and refused.

What goes into the dict is the trainer's ``state_dict`` (``format`` is :data:`CHECKPOINT_FORMAT`); this module
only needs ``format``, ``config``, ``n_timesteps``, ``scene_box`` and ``model`` to rebuild the model.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import torch

from .config import NeRSembleConfig
from .model import NeRSembleModel

CHECKPOINT_FORMAT = 1
_HASH_TAG = b"NERSEMBLE-SHA256"  # then 32 bytes of SHA-256 over everything before the tag
_HASHED_KEY = "content_hash"  # True in every checkpoint written with the trailer
UNVERIFIED = "written before checksums; not verified (loaded as it is)"


class CheckpointError(ValueError):
    """A checkpoint file that is cut short, corrupt or not a checkpoint; the message names the file."""


def save_checkpoint(checkpoint: dict[str, Any]) -> bytes:
    """The checkpoint's bytes: torch's file, then the tag and the SHA-256 of that file (written last)."""
    buffer = io.BytesIO()
    torch.save({**checkpoint, _HASHED_KEY: True}, buffer)
    payload = buffer.getvalue()
    return payload + _HASH_TAG + hashlib.sha256(payload).digest()


def verify_checkpoint(data: bytes, name: str = "checkpoint") -> tuple[bytes, bool]:
    """(torch payload, verified): verified when the content hash matches; False when there is no hash at all.

    A hash that does not match is a :class:`CheckpointError`; a file without one is only a candidate (an old
    checkpoint, or one cut short) that :func:`load_checkpoint` tells apart by reading it.
    """
    tail = len(_HASH_TAG) + 32
    if len(data) < tail or data[-tail:-32] != _HASH_TAG:
        return data, False
    payload = data[:-tail]
    if hashlib.sha256(payload).digest() != data[-32:]:
        raise CheckpointError(f"{name}: corrupt checkpoint (its content hash does not match: bytes changed on disk)")
    return payload, True


def load_checkpoint(data: bytes, map_location: str | torch.device = "cpu", name: str = "checkpoint",
                    warnings: list[str] | None = None) -> dict[str, Any]:
    """A verified checkpoint from bytes, with weights-only loading (no pickled code runs).

    ``name`` (the file) goes into the :class:`CheckpointError` of a damaged or unreadable checkpoint. A checkpoint
    from before content hashes loads unverified, and says so in ``warnings`` (see the module doc).
    """
    payload, verified = verify_checkpoint(data, name)
    try:
        checkpoint = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - unreadable: say which file, not torch's advice
        if not verified:
            raise CheckpointError(f"{name}: not a complete checkpoint (no content hash at its end and unreadable: "
                                  f"cut short, or not written by this pipeline)") from None
        raise CheckpointError(f"{name}: cannot be read as a checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{name}: not a checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    if not verified:
        if checkpoint.get(_HASHED_KEY):
            raise CheckpointError(f"{name}: not a complete checkpoint (written with a content hash that is gone: "
                                  f"cut short)")
        if warnings is not None:
            warnings.append(f"{name}: {UNVERIFIED}")
    checkpoint.pop(_HASHED_KEY, None)
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], device: torch.device | str = "cpu",
                          backend: str = "auto", eval_substeps: int | None = None) -> NeRSembleModel:
    """Rebuild the trained model (eval mode) from a checkpoint's config, box and weights.

    ``eval_substeps`` replaces the trained config's render step (``sampler.eval_substeps``): the weights do not
    depend on it, so a render may trade time for accuracy after training.
    """
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown checkpoint format {checkpoint.get('format')!r}")
    config = NeRSembleConfig.from_dict(checkpoint["config"])
    if eval_substeps is not None:
        config = config.with_overrides({"sampler.eval_substeps": eval_substeps})
    model = NeRSembleModel(config, int(checkpoint["n_timesteps"]), checkpoint["scene_box"], backend=backend)
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()
