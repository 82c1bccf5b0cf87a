"""One trainer per run directory: an exclusive OS file lock held for the whole run.

Two processes training into the same run directory would interleave their checkpoints, recipe
and metrics. The trainer therefore holds ``fcntl.flock(LOCK_EX)`` on ``<run dir>/run.lock``
from before its first write until it ends. The kernel drops the lock when the process dies
(also on ``kill -9``), so a lock is never stale; the file itself stays, holding the last
holder's PID, host and start time, which a refused trainer quotes. Readers (``export``,
``evaluate``) never take it.

The lock is per process: a process that already holds a run directory's lock (a session from
:func:`collabsurgery.train.engine.setup` still alive while :func:`~.engine.train` runs) takes
it again; another process is refused with :class:`RunDirectoryInUse`, one line.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from collabsurgery.errors import UserError, warn

LOCK_FILE = "run.lock"
#: a probe (:func:`check_free`) holds a shared lock for microseconds; a writer taking the lock
#: at that moment tries again for this long before it refuses
_RETRY_SECONDS = 0.5


class RunDirectoryInUse(UserError):
    """Another process holds the run directory's lock."""


@dataclass
class _Held:
    fd: int
    pid: int
    count: int


_HELD: dict[str, _Held] = {}  # lock file (real path) -> this process's hold on it


def _key(path: Path) -> str:
    return os.path.realpath(path)


def _held_here(path: Path) -> _Held | None:
    held = _HELD.get(_key(path))
    return held if held is not None and held.pid == os.getpid() else None  # not a fork's copy


def holder(path: Path) -> str:
    """Who holds (or last held) the lock file ``path``, in words: PID, host and since when."""
    try:
        record = json.loads(path.read_text())
        return f"PID {record['pid']} on host {record['host']}, since {record['since']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "a process that has not said who it is yet"


def _refusal(run_dir: Path, path: Path) -> RunDirectoryInUse:
    return RunDirectoryInUse(
        f"run directory {run_dir} is in use by another trainer ({holder(path)}); two trainers "
        "on one run directory would mix their runs; wait for it to end (or stop it), or give "
        "this run another run.name or run.dir")


def check_free(run_dir: Path) -> None:
    """Refuse at once (:class:`RunDirectoryInUse`) when another process trains in ``run_dir``;
    writes nothing (a missing lock file means free)."""
    path = Path(run_dir) / LOCK_FILE
    if _held_here(path) is not None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (a new run), or unreadable: acquire() decides
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(Path(run_dir), path) from None
    except OSError:
        pass  # a file system without flock: acquire() says so
    finally:
        os.close(fd)


def _flock(fd: int) -> bool:
    """Take the exclusive lock on ``fd``; False while another process holds it."""
    deadline = time.monotonic() + _RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


class RunLock:
    """This process's hold on a run directory's lock; :meth:`release` it (``with acquire(d):``
    releases it at the end of the block)."""

    def __init__(self, run_dir: Path, path: Path, held: _Held | None):
        self.run_dir, self.path = run_dir, path
        self._held = held

    @property
    def held(self) -> bool:
        """False once released, or when the file system could not lock (see :func:`acquire`)."""
        return self._held is not None

    def release(self) -> None:
        """Give the hold back (the lock itself when it was the last one); idempotent."""
        held, self._held = self._held, None
        if held is None or held.pid != os.getpid():
            return
        held.count -= 1
        if held.count == 0:
            _HELD.pop(_key(self.path), None)
            os.close(held.fd)  # closing the descriptor drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def acquire(run_dir: Path) -> RunLock:
    """Hold ``run_dir``'s lock (creating the directory and ``run.lock`` if needed) and record
    this process as its holder; :class:`RunDirectoryInUse` when another process holds it.

    On a file system without ``flock`` the run goes on unlocked, with a one-line warning.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    held = _held_here(path)
    if held is not None:
        held.count += 1
        return RunLock(run_dir, path, held)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise UserError(f"cannot create the lock file {path} ({err.strerror or err}); valid: "
                        "run.dir in a writable directory") from None
    try:
        locked = _flock(fd)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        warn(f"cannot lock {path} ({err.strerror}); nothing stops a second trainer on this "
             "run directory from mixing its run into this one")
        return RunLock(run_dir, path, None)
    if not locked:
        os.close(fd)
        raise _refusal(run_dir, path)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    held = _Held(fd, os.getpid(), 1)
    _HELD[_key(path)] = held
    return RunLock(run_dir, path, held)


def is_held(run_dir: Path) -> bool:
    """Whether some process (this one included) holds ``run_dir``'s lock now."""
    path = Path(run_dir) / LOCK_FILE
    if _held_here(path) is not None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
