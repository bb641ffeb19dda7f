"""The lock of a ``journal:FILE`` study: one that a killed worker cannot turn into a hang.

Optuna's default journal lock (``JournalFileSymlinkLock``) creates ``FILE.lock`` as a symbolic link to
``FILE`` *as written*: for a relative path in a sub-folder (``runs/study.log``) the link's target
does not resolve from the link's own folder, so once a worker is killed while holding it, every
later worker spins at full CPU without ever reaching the forced release (its ``stat`` of the dangling
link fails and the loop retries at once). This lock follows Optuna's recommended exclusive-create
file lock (``JournalFileOpenLock``: ``open(O_CREAT | O_EXCL)``, which also excludes workers still
using the symlink lock on the same file), on the absolute path, and adds:

* the holder's host and process id in the lock file: a lock left by a dead process of this host is
  released at once;
* Optuna's grace period for other holders (a lock untouched for ``grace_s`` is released: appends
  take milliseconds);
* a bounded wait: after ``timeout_s`` the worker stops with a one-line error naming the lock file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
import uuid

from optuna.storages.journal._file import BaseJournalFileLock

from planner.errors import PlannerError
from planner.io import process_alive

GRACE_S = 30.0
TIMEOUT_S = 120.0


class JournalLock(BaseJournalFileLock):
    """An exclusive-create lock file ``<journal>.lock`` (absolute path) with a bounded wait (see the module)."""

    def __init__(self, journal_path: str, grace_s: float = GRACE_S, timeout_s: float = TIMEOUT_S):
        self.lock_file = os.path.abspath(journal_path) + ".lock"
        self.grace_s = grace_s
        self.timeout_s = timeout_s
        self.owner = f"{socket.gethostname()} {os.getpid()}\n"

    def acquire(self) -> bool:
        """Take the lock, waiting at most ``timeout_s``; PlannerError when it stays held."""
        deadline = time.monotonic() + self.timeout_s
        pause = 0.001
        while True:
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                stale = self._stale()
                if stale is not None:
                    self._break(stale)
                    continue
                if time.monotonic() > deadline:
                    raise PlannerError(
                        f"journal lock {self.lock_file} has been held for more than {self.timeout_s:g} s "
                        f"({self._holder()}); if no worker of this study runs, delete it") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
                continue
            except OSError as e:
                raise PlannerError(f"cannot lock journal {self.lock_file}: {e.strerror or e}") from None
            try:
                os.write(fd, self.owner.encode())
            finally:
                os.close(fd)
            return True

    def release(self) -> None:
        """Give the lock back (renamed first, so that a lock another worker took meanwhile is not deleted)."""
        moved = f"{self.lock_file}.{uuid.uuid4().hex}.rename"
        try:
            os.rename(self.lock_file, moved)
        except OSError:
            raise RuntimeError(f"journal lock {self.lock_file} was not held") from None
        with contextlib.suppress(OSError):
            os.unlink(moved)

    def _stale(self) -> tuple[int, int, float] | None:
        """The identity of the current lock file when it belongs to a dead process of this host or is older
        than the grace period, else None."""
        try:
            info = os.lstat(self.lock_file)  # lstat: Optuna's symlink lock may dangle
        except OSError:
            return None  # released meanwhile: try again
        ident = (info.st_dev, info.st_ino, info.st_mtime)
        if time.time() - info.st_mtime > self.grace_s:
            return ident
        host, pid = self._read_owner()
        dead = host == socket.gethostname() and pid is not None and pid != os.getpid() and not process_alive(pid)
        return ident if dead else None

    def _read_owner(self) -> tuple[str | None, int | None]:
        try:
            with open(self.lock_file, "rb") as f:  # a symlink lock has no owner to read (or dangles)
                words = f.read(256).decode("utf-8", "replace").split()
        except OSError:
            return None, None
        if len(words) == 2 and words[1].isdigit():
            return words[0], int(words[1])
        return None, None

    def _holder(self) -> str:
        host, pid = self._read_owner()
        return f"held by process {pid} on {host}" if pid is not None else "holder unknown"

    def _break(self, ident: tuple[int, int, float]) -> None:
        """Remove the stale lock ``ident`` (unless another worker already replaced it with a live one)."""
        try:
            info = os.lstat(self.lock_file)
        except OSError:
            return
        if (info.st_dev, info.st_ino, info.st_mtime) != ident:
            return
        moved = f"{self.lock_file}.{uuid.uuid4().hex}.rename"
        try:
            os.rename(self.lock_file, moved)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise PlannerError(f"cannot release stale journal lock {self.lock_file}: {e.strerror or e}") from None
            return
        with contextlib.suppress(OSError):
            os.unlink(moved)
