"""OUT/metrics.jsonl: one JSON line per log or validation record, appended by the main process.

It is read through ``utils.io.read_jsonl``, the one JSON-lines reader: a last line cut short by a kill is skipped,
a bad line anywhere else is a damaged log (a UserError naming the line), never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selective_attention.utils.io import atomic_write_text, read_jsonl


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl that have an integer "step" ([] when there is no log)."""
    return [rec for rec in read_jsonl(path) if isinstance(rec, dict) and isinstance(rec.get("step"), int)]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if path.is_file():
        keep = [rec for rec in read_metrics(path) if rec["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in keep))


class MetricsLog:
    """Appends one JSON line per record to OUT/metrics.jsonl (only on the main process)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
