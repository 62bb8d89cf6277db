"""Run directories -> records: each training run's ``run.json`` and ``metrics.jsonl``, grouped into methods.

Both files are read with the project's one reader per format (``utils.io``): a half-written last metrics line (a
run in progress) is skipped, a bad line anywhere else is a UserError naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selective_attention.errors import UserError
from selective_attention.utils.io import read_json, read_jsonl
from selective_attention.utils.stats import is_finite


@dataclass
class RunRecord:
    path: Path
    info: dict[str, Any]
    metrics: list[dict[str, Any]]
    label: str = ""

    @property
    def seed(self) -> Any:
        return self.info.get("seed", self.info.get("config", {}).get("seed"))

    def val_curve(self) -> tuple[np.ndarray, np.ndarray]:
        return self._curve("val_ppl")

    def train_curve(self) -> tuple[np.ndarray, np.ndarray]:
        return self._curve("train_loss")

    def _curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, value) of every metrics line with a finite ``key``, sorted by tokens."""
        pts = sorted(
            (float(m["tokens"]), float(m[key]))
            for m in self.metrics
            if key in m and m.get("tokens") is not None and is_finite(m[key])
        )
        if not pts:
            return np.zeros(0), np.zeros(0)
        t, p = zip(*pts)
        return np.asarray(t), np.asarray(p)

    def last_metric(self, key: str) -> float | None:
        """The last finite ``key`` of metrics.jsonl (e.g. "val_ppl"), or None."""
        for m in reversed(self.metrics):
            if key in m and is_finite(m[key]):
                return float(m[key])
        return None


def method_label(info: dict[str, Any]) -> str:
    """vanilla | ssa (shared weights, the default) | ssa-mlp | an explicit ``label`` in run.json."""
    if info.get("label"):
        return str(info["label"])
    att = info.get("attention", info.get("config", {}).get("attention", "?"))
    if att != "ssa":
        return str(att)
    sharing = info.get("config", {}).get("sharing") or info.get("config", {}).get("ssa", {}).get("sharing")
    return "ssa" if sharing in (None, "shared") else f"ssa-{sharing}"


def load_run(path: str | os.PathLike, label: str | None = None) -> RunRecord:
    path = Path(path)
    run_json, metrics_path = path / "run.json", path / "metrics.jsonl"
    if not path.is_dir():
        raise UserError(f"not a run directory: {path}")
    if not run_json.is_file() and not metrics_path.is_file():
        raise UserError(f"{path} has neither run.json nor metrics.jsonl (is it a training run directory?)")
    info = read_json(run_json, "a run's run.json") if run_json.is_file() else {}
    if not isinstance(info, dict):
        raise UserError(f"{run_json}: expected a JSON object")
    metrics = read_jsonl(metrics_path)
    bad = next((i for i, m in enumerate(metrics) if not isinstance(m, dict)), None)
    if bad is not None:
        raise UserError(f"{metrics_path}: record {bad + 1} is not a JSON object")
    run = RunRecord(path=path, info=info, metrics=metrics)
    run.label = label or method_label(info)
    return run


def group_runs(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    """{method label: its runs}, in the order the methods first appear."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    return groups
