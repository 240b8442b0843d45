"""One line for the operating system's refusals: permission, read-only file system, missing path, full disk.

These come from deep inside a stage (a lock file, a zarr chunk, a report), where the code cannot know what the
user asked for; what the user needs is the path and the reason, not fifty lines of traceback.
"""

from __future__ import annotations

import errno
import os

# errno -> (what could not be done, why), for the failures a user can fix by choosing another path or making room.
_REASONS = {
    errno.EACCES: ("cannot access", "permission denied"),
    errno.EPERM: ("cannot access", "operation not permitted"),
    errno.EROFS: ("cannot write", "read-only file system"),
    errno.ENOSPC: ("cannot write", "no space left on device"),
    errno.EDQUOT: ("cannot write", "disk quota exceeded"),
    errno.EFBIG: ("cannot write", "file too large for this file system"),
    errno.ENOENT: ("cannot find", "no such file or folder"),
    errno.ENOTDIR: ("cannot use", "a part of the path is a file, not a folder"),
    errno.EISDIR: ("cannot use", "it is a folder, not a file"),
    errno.ENAMETOOLONG: ("cannot use", "file name too long"),
}


def os_error_message(error: BaseException) -> str | None:
    """``cannot write /x/y: read-only file system`` for an OSError a user can act on; None for anything else.

    An OSError raised with its own message (our code's, e.g. "no sequence folder at ...") keeps that message.
    """
    if not isinstance(error, OSError):
        return None
    if error.errno is None:  # raised by our code with a sentence, not by the OS
        return str(error) if isinstance(error, (PermissionError, FileNotFoundError, FileExistsError)) else None
    if error.errno not in _REASONS:
        return None
    if error.strerror and error.strerror != os.strerror(error.errno):  # our own sentence with an errno
        named = error.filename is None or str(error.filename) in error.strerror
        return error.strerror if named else f"{error.strerror}: {error.filename}"
    action, reason = _REASONS[error.errno]
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    return f"{action} {' -> '.join(paths)}: {reason}" if paths else f"{action}: {reason}"
