"""File integrity and disk space: sha256 of a file, fsync, and disk-full errors that name the path and the space."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from selective_attention.errors import UserError
from selective_attention.utils.io import umask

DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
# what torch.save / safetensors say when a write comes up short (they do not always keep the OSError)
DISK_FULL_TEXT = (
    "No space left",
    "StorageFull",
    "Disk quota",
    "os error 28",
    "code: 28",
    "requested and",
    "enforce fail at inline_container",
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path`` to the disk (an atomic rename of an unflushed file can come back empty after a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def require_space(path: str | os.PathLike, needed: int, what: str = "") -> None:
    """UserError, before writing, when the disk of ``path`` has less than ``needed`` bytes free."""
    free = free_bytes(path)
    if free < needed:
        raise disk_full_error(path, needed, free, what)


def is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    return any(s in str(exc) for s in DISK_FULL_TEXT)


def disk_full_error(path: str | os.PathLike, needed: int, free: int | None = None, what: str = "") -> UserError:
    free = free_bytes(path) if free is None else free
    extra = f"; {what}" if what else ""
    return UserError(
        f"not enough disk space to write {path}: it needs about {human_bytes(needed)}, "
        f"{human_bytes(free)} free on that disk{extra}"
    )


def follow_umask(paths: Iterable[str | os.PathLike]) -> None:
    """Give files and directories that libraries create private (safetensors: 0o600, mkdtemp: 0o700) the modes
    open() and mkdir() would have given them: 0o666 / 0o777 minus the umask."""
    mask = umask()
    for p in paths:
        os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~mask)
