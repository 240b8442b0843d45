"""Small helpers for treating local paths and fsspec URLs alike."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URLs, which get real file locks and atomic renames."""
    return "://" not in uri or uri.startswith("file://")


def normalize(uri: str | os.PathLike[str]) -> str:
    """Canonical form: local paths absolute without ``file://``, URLs without a trailing slash."""
    text = os.fspath(uri)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_local(text):
        return os.path.abspath(os.path.expanduser(text))
    scheme, _, rest = text.partition("://")
    return f"{scheme}://{rest.rstrip('/')}" if rest.rstrip("/") else f"{scheme}://"


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a path or URL with '/' (never a backslash, never dropping the scheme)."""
    out = uri.rstrip("/") if uri.rstrip("/") else uri
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (fsspec imported on first use)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def basename(uri: str) -> str:
    """Last path component of a path or URL."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    """Everything before the last path component."""
    return uri.rstrip("/").rsplit("/", 1)[0]
