"""Atomic writes: a crash mid-write never leaves a half-written result or checkpoint behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it: swapping it
    briefly would let a concurrent thread create files with the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``. The file gets
    the mode a plain ``open(path, "w")`` would (0o666 minus the umask), not mkstemp's private 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX
            os.fchmod(fd, 0o666 & ~umask())
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---- the one reader per format: JSON files and JSON-lines logs


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """The JSON object in ``path``; a missing or unreadable file is a one-line UserError that names it (and
    ``what`` it should have been, e.g. "a run's run.json")."""
    from selective_attention.errors import UserError, first_line

    path = Path(path)
    kind = f" ({what})" if what else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}{kind} does not exist") from None
    except OSError as e:
        raise UserError(f"{path}{kind} cannot be read: {first_line(e)}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError(f"{path}{kind} is not valid JSON ({first_line(e)})") from None


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON-lines log (``metrics.jsonl``); [] when there is none. Blank lines are skipped and so
    is a last line cut short by a kill (a run in progress or stopped mid-write); a bad line anywhere else is
    corruption, a UserError naming the line, never silently dropped."""
    from selective_attention.errors import UserError

    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise UserError(
                    f"{path}: line {i + 1} is not JSON (the log is damaged): repair or delete that line, then rerun"
                ) from None
    return records
