"""Local data files and folders, with every operating-system failure as a one-line :class:`DataError`.

``Path.is_dir()`` / ``is_file()`` answer False for a folder that exists but cannot be read (or raise
``PermissionError`` for a file inside one), and ``read_text`` raises bare ``OSError``s; the task readers use these
helpers instead, so a data root that is a file, an unreadable folder or an unreadable file is named as such.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from mtbench.errors import DataError


_ABSENT = (errno.ENOENT, errno.ENOTDIR)


def data_folder(root: Path, hint: str) -> Path:
    """``root`` if it is a folder this process can list and enter.

    Raises:
        DataError: it does not exist, is a file, or cannot be read; ``hint`` says what belongs there.
    """
    try:
        mode = root.stat().st_mode
    except OSError as exc:
        if exc.errno in _ABSENT:
            raise DataError(f"data folder {root} (task.data_root / $MTBENCH_DATA) does not exist; {hint}") from exc
        raise DataError(f"data folder {root}: cannot be read ({exc.strerror})") from exc
    if not stat.S_ISDIR(mode):
        raise DataError(f"data folder {root} (task.data_root / $MTBENCH_DATA) is a file, not a folder; {hint}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data folder {root}: cannot be read (permission denied)")
    return root


def _kind(path: Path) -> int | None:
    """``st_mode`` of ``path``, or None when it does not exist; a folder on the way that cannot be entered is an
    error, not a missing file."""
    try:
        return path.stat().st_mode
    except OSError as exc:
        if exc.errno in _ABSENT:
            return None
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from exc


def is_file(path: Path) -> bool:
    """Whether ``path`` is an existing regular file (``DataError`` if a folder on the way cannot be entered)."""
    mode = _kind(path)
    return mode is not None and stat.S_ISREG(mode)


def is_folder(path: Path) -> bool:
    """Whether ``path`` is an existing folder (``DataError`` if a folder on the way cannot be entered)."""
    mode = _kind(path)
    return mode is not None and stat.S_ISDIR(mode)


def read_text(path: Path, expected: str) -> str:
    """The UTF-8 text of ``path`` (a BOM is dropped).

    Raises:
        DataError: the file cannot be read (missing, a folder, permission denied, I/O error) or is not UTF-8;
            ``expected`` says what the file should hold.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror}); expected {expected}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); expected {expected}") from exc
