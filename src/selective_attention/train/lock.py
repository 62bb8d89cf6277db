"""One run per run directory: an OS file lock on OUT/.lock (``fcntl.flock``), which the kernel releases when
its process ends, however it ends (a crash or SIGKILL leaves no stale lock). The holder writes its PID into the
file so that a second run can say who holds it."""

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
        self.created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUse(f"--out {self.path.parent} is in use by another ssa train run (PID {holder}): wait "
                            "for it to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def discard(self) -> None:
        """Release the lock and remove its file if this process created it (a refused run leaves no trace)."""
        if self.fd is not None and self.created:
            self.path.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None
