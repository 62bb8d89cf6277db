"""Write a model directory atomically, with a manifest of the files written, and replace one only when it is
recognisably ours: ``--force`` never removes anything the tool did not write, and a refusal offers ``--force``
only where it would be accepted.

Every file gets the mode a plain ``open()`` would give it (0o666 minus the umask; directories 0o777 minus it),
not the private 0o600 / 0o700 of safetensors and mkdtemp. ``save_pretrained(model, out, tokenizer)`` saves a
(converted) model this way; a model's own ``model.save_pretrained`` leaves safetensors' 0o600."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError
from selective_attention.utils.files import follow_umask
from selective_attention.utils.io import atomic_write_json

MANIFEST = "ssa-manifest.json"


def _files(root: Path) -> list[str]:
    """Every entry under ``root`` as a relative POSIX path (directories end in '/'), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        out += [(rel / d).as_posix() + "/" for d in dirnames]
        out += [(rel / f).as_posix() for f in filenames]
    return sorted(out)


def written_by_us(out: Path) -> bool:
    """``out`` is a directory this tool wrote, unchanged since: its manifest lists exactly what is in it."""
    manifest = out / MANIFEST
    if out.is_symlink() or not out.is_dir() or not manifest.is_file():
        return False
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(listed, list) and sorted(listed) == [f for f in _files(out) if f != MANIFEST]


def check_output(out: Path, force: bool) -> None:
    """UserError unless ``out`` may be written: absent, an empty directory, or (with ``force``) a model directory
    that this tool wrote (anything else, a file or a directory with other content, is never removed). The
    message without ``force`` suggests it only where ``force`` would be accepted."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not written_by_us(out):
        what = "is a symlink" if out.is_symlink() else "exists and is not empty" if out.is_dir() else "is a file"
        raise UserError(
            f"--out {out} {what} and was not written by ssa convert, or has changed since (no {MANIFEST} that "
            "lists exactly its files): remove it yourself or choose another --out (--force only replaces a "
            "directory that ssa convert wrote, unchanged since)"
        )
    if not force:
        raise UserError(
            f"--out {out} exists and is not empty: it holds an earlier ssa convert output, pass --force to replace it"
        )


def write_model_dir(out: Path, write: Callable[[Path], None], *, force: bool = False) -> None:
    """Call ``write(tmp_dir)`` beside ``out``, add the manifest, then swap it in: a crash never leaves a
    half-written model directory, and an existing ``out`` is replaced only if ``check_output`` allows it."""
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        follow_umask([tmp, *tmp.rglob("*")])  # mkdtemp makes the directory 0o700, safetensors its files 0o600
        atomic_write_json(tmp / MANIFEST, {"files": [f for f in _files(tmp) if f != MANIFEST]})
        if out.exists():
            check_output(out, force)  # again, just before removing: it may have changed while we wrote
            shutil.rmtree(out)  # an empty directory or one that holds only what we wrote
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(
    model: Any,
    out: str | os.PathLike,
    tokenizer: Any = None,
    *,
    force: bool = False,
    json_files: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` (a Hugging Face model, SSA-converted or plain), ``tokenizer`` and ``json_files`` ({name:
    object}, written beside them) to the directory ``out`` as ``ssa convert`` does: atomically, with its manifest,
    every file following the umask; ``force`` replaces a directory written this way (and nothing else). Load it
    again with ``from_pretrained``."""
    out = Path(out)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (json_files or {}).items():
            atomic_write_json(tmp / name, obj)

    write_model_dir(out, write, force=force)
    return out
