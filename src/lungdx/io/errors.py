"""Errors raised while reading images."""

from __future__ import annotations

import os
from pathlib import Path


class ImageReadError(Exception):
    """Raised when an image cannot be read; the message names the file and the reason.

    Attributes:
        path: The file that could not be read, as a string.
        reason: Why it could not be read, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # The default reduce passes only the formatted message back to __init__, which
        # takes two arguments; keep the error picklable (multiprocessing DataLoaders).
        return (type(self), (self.path, self.reason))


def require_file(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path, or raise ImageReadError when it is not an existing file."""
    file = Path(path)
    if not file.exists():
        raise ImageReadError(file, "file not found")
    if not file.is_file():
        raise ImageReadError(file, "not a regular file")
    return file
