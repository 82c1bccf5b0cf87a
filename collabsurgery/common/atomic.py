"""Files that appear whole or not at all, with the user's permissions, and durable on disk.

Every file a run or an export writes goes through :func:`atomic_path`: the content is written to
a temporary file in the target's directory (created with mode 0o666 minus the umask, as
``open()`` would), flushed to disk with ``fsync``, renamed over the target, and the directory is
synced, so a crash or power loss leaves either the old file or the new one.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from collabsurgery.errors import UserError


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's content and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is synced and renamed over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. A directory at
    ``path``, or a parent that cannot be created or written, is a :class:`UserError`.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a directory; valid: a file path such as "
                        f"{path / 'backbone.safetensors'}")
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = tmp.stat().st_mode & 0o777  # 0o666 less the umask (os.umask cannot be read
        # without setting it, which would race with other threads)
    except OSError as err:  # parent is a file, no permission, ...
        raise UserError(f"cannot write {path} ({err.strerror or err}); valid: a path in a "
                        "writable directory") from None
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer may have replaced the file with its own private one
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
