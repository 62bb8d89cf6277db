"""One run per run directory: an OS file lock on OUT/.lock (``fcntl.flock``), which the kernel releases when
its process ends, however it ends (a crash or SIGKILL leaves no stale lock). The holder writes its PID into the
file so that a second run can say who holds it.

The file is only ever unlinked by the process that holds its lock, and a process that has taken the lock checks
that the file it locked is still the one at OUT/.lock (else it opened a file that its holder removed since, and
locking that one would let a third process lock a new file beside it: it tries again)."""

from __future__ import annotations

import os
from pathlib import Path

from selective_attention.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# set for the processes of `ssa train --nproc N`: their parent holds the lock of this (resolved) directory
ENV_HELD = "SSA_RUN_LOCK_HELD"


class RunInUse(UserError):
    """Another process holds this run directory (a study's parallel workers skip such runs)."""


class RunLock:
    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self.fd: int | None = None
        self.created = False  # this process created the lock file

    def acquire(self) -> RunLock:
        """Take the lock (UserError naming the holder's PID when another process has it)."""
        if fcntl is None or os.environ.get(ENV_HELD) == str(self.path.parent):
            return self
        while True:
            self.created = not self.path.exists()
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # the run that created OUT gave up and removed it: it is free again
                self.path.parent.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunInUse(
                    f"--out {self.path.parent} is in use by another ssa train run (PID {holder}): wait "
                    "for it to finish or choose another directory"
                ) from None
            if self._is_current(fd):
                break
            os.close(fd)  # its holder removed that file after we opened it: lock the one at the path now
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _is_current(self, fd: int) -> bool:
        """``fd`` is the file at the lock's path (not one unlinked since it was opened)."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)

    @property
    def held(self) -> bool:
        """This process holds the lock (or this OS has no locks to hold)."""
        return self.fd is not None or fcntl is None

    def discard(self, always: bool = False) -> None:
        """Release the lock and remove its file if this process created it (``always``: in any case), so that a
        refused run leaves no trace. The file goes while the lock is held, never after: see the module's note."""
        if self.fd is not None and (self.created or always):
            self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None
