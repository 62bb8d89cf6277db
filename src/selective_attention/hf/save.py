"""Write a model directory atomically, with a manifest of the files written, and replace one only when it is
recognisably ours: ``--force`` never removes anything the tool did not write."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

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
    that this tool wrote (anything else, a file or a directory with other content, is never removed)."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"--out {out} exists and is not empty (use --force to overwrite)")
    if not written_by_us(out):
        raise UserError(
            f"--out {out} exists and was not written by ssa convert (no matching {MANIFEST}): "
            "refusing to overwrite it, remove it yourself or choose another --out"
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
