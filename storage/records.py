"""Stage records and the hashes that decide whether a stage can be skipped.

A stage writes its outputs first and its :class:`StageRecord` last. On the next run the
pipeline compares the stored record with the current config hash and input digest: a match
means the outputs on disk are the ones this config would produce, so the stage is skipped and
a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

HASH_CHARS = 16


def utc_now_iso() -> str:
    """Current time as ISO-8601 UTC with a trailing 'Z' (sortable, unambiguous across hosts)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_jsonable(value: Any) -> Any:
    """Turn numpy values, tuples, sets, paths and dataclasses into plain JSON types.

    Reports and hashes are built from whatever stages hand over (numpy scalars from metrics,
    tuples from configs); normalising here keeps zarr attrs and report files valid JSON.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((to_jsonable(v) for v in value), key=_canonical)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if hasattr(value, "model_dump"):
        return to_jsonable(value.model_dump(mode="json"))
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot turn {type(value).__name__} into JSON: {value!r}")


def _canonical(value: Any) -> str:
    """Canonical JSON text: sorted keys, no whitespace, so equal values give equal hashes."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha16(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_CHARS]


def config_hash(config: Any) -> str:
    """Hash a stage config (a mapping, dataclass or pydantic model) to 16 hex chars.

    Key order and container types do not matter; values do. Two configs that would make a
    stage produce the same outputs must hash the same, so pass only what affects the outputs.
    """
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif not isinstance(config, Mapping):
        raise TypeError(f"config_hash expects a mapping, dataclass or pydantic model, got {type(config).__name__}")
    return _sha16(_canonical(config))


def digest_of(*parts: object) -> str:
    """Hash anything JSON-like (file names, sizes, mtimes, upstream hashes) to 16 hex chars.

    Used as a stage's input digest: if an upstream output changes, the digest changes and the
    stage reruns even though its own config did not.
    """
    return _sha16(_canonical(list(parts)))


@dataclass(frozen=True)
class StageRecord:
    """What a finished stage leaves in the capture store's ``attrs["stages"][stage]``."""

    stage: str
    version: str
    config_hash: str
    input_digest: str = ""
    finished_at: str = field(default_factory=utc_now_iso)
    report: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-compatible dict (what goes into zarr attrs; ``json.dumps`` it for text)."""
        return {
            "stage": self.stage,
            "version": self.version,
            "config_hash": self.config_hash,
            "input_digest": self.input_digest,
            "finished_at": self.finished_at,
            "report": to_jsonable(self.report),
        }

    def to_json_text(self) -> str:
        """The record as JSON text."""
        return json.dumps(self.to_json(), sort_keys=True, indent=2)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str | bytes) -> StageRecord:
        """Rebuild a record from :meth:`to_json` output (a dict) or JSON text; unknown keys are ignored."""
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        if not isinstance(data, Mapping):
            raise TypeError(f"a stage record must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("stage", "version", "config_hash") if k not in data]
        if missing:
            raise ValueError(f"stage record is missing {missing}: {dict(data)!r}")
        return cls(
            stage=str(data["stage"]),
            version=str(data["version"]),
            config_hash=str(data["config_hash"]),
            input_digest=str(data.get("input_digest") or ""),
            finished_at=str(data.get("finished_at") or ""),
            report=dict(data.get("report") or {}),
        )

    def matches(self, config_hash: str, input_digest: str | None = None, version: str | None = None) -> bool:
        """True if this record was made by the same config (and inputs/version, when given)."""
        if self.config_hash != config_hash:
            return False
        if input_digest is not None and self.input_digest != input_digest:
            return False
        return version is None or self.version == version
