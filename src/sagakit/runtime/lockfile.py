"""An exclusive lock file: one process at a time on an embedded database or data directory.

SQLite files of the embedded deployment are consumed by one process only: two engines
on one file would both hand out its mailbox and fire its timers. A :class:`LockFile`
holds ``fcntl.flock`` on a file (``x.db.lock`` next to ``x.db``, ``.lock`` in a data
directory) while the engine is open and writes the holder's pid into it, so that a
second process is refused with an error that names the first one.

The kernel drops a ``flock`` when its holder dies (``kill -9`` included), so a stale
file never blocks a restart. The file itself is left in place: deleting it on release
would let two processes hold locks on two different files of the same name.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from pathlib import Path
from types import TracebackType

from sagakit.errors import ConfigurationError

log = logging.getLogger(__name__)


class LockFile:
    """``flock(LOCK_EX)`` on ``path`` while acquired; the file holds the holder's pid.

    ``what`` names the locked thing in the error (the database, the data directory) and
    ``hint`` says what to do about it. A lock is held per open file, so a second
    :class:`LockFile` on the same path is refused even within one process.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        what: str | None = None,
        hint: str = "stop it or use another file",
    ) -> None:
        self.path = Path(path)
        self.what = what if what is not None else str(self.path)
        self.hint = hint
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`ConfigurationError` naming the holder's pid."""
        if self._fd is not None:
            return
        try:
            # Not O_TRUNC: the file may hold another process's pid, read for the error.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the lock file {self.path} for {self.what}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            who = f"another sagakit process (pid {pid})" if pid else "another sagakit process"
            raise ConfigurationError(f"{self.what} is in use by {who}; {self.hint}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock is what counts; the pid only improves the other side's error
        self._fd = fd

    def release(self) -> None:
        """Let go of the lock (idempotent); the file stays, see the module docstring."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale pid for a reader that finds it unlocked
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> LockFile:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def private_dir(path: str | Path, *, warn: bool = True) -> Path:
    """Create the data directory ``path`` readable by its owner only (0700); return it.

    A data directory holds databases, logs and keys: other users of the machine have no
    business listing it. Missing parents are created as ``mkdir -p`` would. A directory
    that exists already is left as its owner made it, with a warning when others may
    read it (unless ``warn`` is false: a file's own directory, chosen by the user for
    other files too): changing the mode of a directory the user chose is not ours to
    do silently.
    """
    p = Path(path)
    try:
        p.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not p.is_dir():
            raise ConfigurationError(f"{p} is not a directory") from None
        mode = stat.S_IMODE(p.stat().st_mode)
        if warn and mode & 0o077:
            log.warning(
                "data directory %s is open to other users (mode %o): it holds databases "
                "and logs; chmod 700 %s",
                p,
                mode,
                p,
            )
    return p


def data_dir_lock(data_dir: str | Path) -> LockFile:
    """The lock of a data directory (``sagakit demo``, ``sagakit serve``): ``.lock`` in it,
    not yet acquired (``with data_dir_lock(d):``, or :meth:`LockFile.acquire`)."""
    return LockFile(
        Path(data_dir) / ".lock",
        what=f"the data directory {data_dir}",
        hint="stop it or pick another --data-dir",
    )


def holder(path: str | Path) -> int | None:
    """The pid written in the lock file at ``path`` (None: none, or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_pid(fd)
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
