"""A full disk while writing a file or a folder: one line that says what it needed, not a
traceback.

A write that runs out of space fails as ``OSError(ENOSPC)`` (or ``EDQUOT``, over quota), or,
inside safetensors' Rust writer, as a ``SafetensorError`` whose text quotes "os error 28".
:func:`refuse_when_full` turns either into :class:`DiskFull`, a UserError (the CLI prints it on
one line and exits with status 2), after removing what was half written::

    with refuse_when_full(f"checkpoint {tmp.name}", run_dir, needed=tensor_bytes(state),
                          kept="the last good checkpoint ckpt-00000008 is kept", remove=tmp):
        write(tmp)
"""
from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from collabsurgery.errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)
#: how safetensors' Rust writer words ENOSPC / EDQUOT (its error carries no errno)
_FULL_TEXT = ("os error 28", "os error 122", "no space left on device", "disk quota exceeded")


class DiskFull(UserError, OSError):
    """No space left on the device for a file or folder being written; nothing half-written
    is left behind. An OSError too, as the failure it replaces (``except OSError`` still
    catches it)."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what it wraps) is running out of disk space or quota."""
    while err is not None:
        if isinstance(err, DiskFull) or (isinstance(err, OSError) and err.errno in _FULL):
            return True
        if type(err).__name__ == "SafetensorError" and any(
                text in str(err).lower() for text in _FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged user may still write on ``path``'s file system (its nearest
    existing ancestor's); None when that cannot be read."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human(size: int | None) -> str:
    """``size`` bytes as a short decimal quantity (``12.3 MB``)."""
    if size is None:
        return "an unknown amount"
    value = float(size)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def tensor_bytes(tree: Any) -> int:
    """Bytes of every tensor in a (nested) state dict: about what writing it takes."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, Mapping):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def refuse_when_full(what: str, where: str | os.PathLike, needed: int, kept: str = "",
                     remove: str | os.PathLike | None = None) -> Iterator[None]:
    """Within the block, running out of space raises :class:`DiskFull`: one line naming
    ``what`` was written into ``where``, about ``needed`` bytes against what is free, and
    ``kept`` (what is still intact, e.g. the last good checkpoint); ``remove`` (the
    half-written file or folder) is deleted first. Any other error passes unchanged."""
    try:
        yield
    except BaseException as err:
        if not is_disk_full(err):
            raise
        if remove is not None:
            _remove(Path(remove))
        free = free_bytes(where)
        raise DiskFull(f"no space left on the device for {what} in {where}: it needs about "
                       f"{human(needed)} free and {human(free)} is free; "
                       + (f"{kept}; " if kept else "") + "nothing half-written is left; free "
                       "some space (or write elsewhere) and run it again") from None
