"""Checks on a written report: every <img> a relative path to a complete PNG (the demo and tests use them)."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path


def is_png(path: str | os.PathLike) -> bool:
    """A complete PNG file: signature, IHDR first, IEND last, non-trivial size."""
    p = Path(path)
    if not p.is_file():
        return False
    data = p.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return False
    w, h = struct.unpack(">II", data[16:24])
    return w > 0 and h > 0 and data.endswith(b"IEND\xaeB`\x82")


def broken_images(report_html: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(every <img> src of the report, the ones that are not relative paths to valid PNG files)."""
    report_html = Path(report_html)
    srcs = re.findall(r'<img[^>]*\bsrc="([^"]+)"', report_html.read_text(encoding="utf-8"))
    bad = [
        s
        for s in srcs
        if s.startswith(("/", "http:", "https:", "file:", "data:")) or not is_png(report_html.parent / s)
    ]
    return srcs, bad
