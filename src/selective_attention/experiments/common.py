"""Shared plumbing of the mechanism experiments: seeds, mean/std over seeds, results.json, figures, summary.md.

Every experiment module defines a ``Config`` dataclass and ``run(out, config) -> dict`` (the results.json
content). ``results.json`` shape:
    {"experiment": NAME, "config": {...}, "seeds": [...],
     "methods": {METHOD: {METRIC: mean, METRIC + "_std": std}}, "extra": {...}}
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from selective_attention.errors import UserError
from selective_attention.utils.io import atomic_write, atomic_write_json, atomic_write_text

# Re-exported for the experiment modules that call them as common.*; the one implementation is utils.stats.
from selective_attention.utils.stats import mean_std
from selective_attention.utils.stats import methods_table as markdown_table  # noqa: F401


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return a CPU generator for data sampling (so data and init streams are separate)."""
    random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(10_000 + seed)
    return g


@contextmanager
def single_thread() -> Iterator[None]:
    """Run with one intra-op thread: the tiny models here are faster that way and results are bit-repeatable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def aggregate(per_seed: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """[{method: {metric: value}}] over seeds -> {method: {metric: mean, metric_std: std}}."""
    methods: dict[str, dict[str, float]] = {}
    for method in per_seed[0]:
        methods[method] = {}
        for metric in per_seed[0][method]:
            m, s = mean_std([run[method][metric] for run in per_seed])
            methods[method][metric] = m
            methods[method][metric + "_std"] = s
    return methods


def results_dict(
    name: str,
    config: Any,
    seeds: Sequence[int],
    per_seed: Sequence[dict[str, dict[str, float]]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    out: dict[str, Any] = {
        "experiment": name,
        "config": cfg,
        "seeds": list(seeds),
        "methods": aggregate(per_seed),
        "per_seed": list(per_seed),
    }
    if extra:
        out["extra"] = extra
    return out


def write_results(out: str | Path, results: dict[str, Any]) -> Path:
    return atomic_write_json(Path(out) / "results.json", results)


def write_summary(out: str | Path, text: str) -> Path:
    return atomic_write_text(Path(out) / "summary.md", text.rstrip() + "\n")


def finish(
    out: str | Path,
    results: dict[str, Any],
    figures: Callable[[Path, dict[str, Any]], None],
    summary: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """The common end of every experiment: results.json, its figures, summary.md; returns ``results``."""
    write_results(out, results)
    figures(Path(out), results)
    write_summary(out, summary(results))
    return results


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def verdict(ok: bool) -> str:
    return "**reproduced**" if ok else "**not reproduced**"


def progress(total: int, description: str, enabled: bool = True) -> Any:
    """A tqdm bar on stderr (disabled in tests / when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, disable=not enabled, leave=False, dynamic_ncols=True)


def parse_overrides(pairs: Sequence[str], config_cls: type) -> dict[str, Any]:
    """``["steps=500", "lr=0.01"]`` -> typed kwargs for ``config_cls`` (types taken from its defaults)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    defaults = config_cls()
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise UserError(f"unknown setting {key!r}; known: {', '.join(sorted(fields))}")
        current = getattr(defaults, key)
        try:
            if isinstance(current, bool):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                out[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(current, int):
                out[key] = int(value)
            elif isinstance(current, float):
                out[key] = float(value)
            elif isinstance(current, tuple):
                kind = type(current[0]) if current else float
                out[key] = tuple(kind(v) for v in value.split(",") if v.strip())
            else:
                out[key] = value
        except ValueError:
            raise UserError(f"bad value for {key}: {value!r}") from None
    return out


def pooled_zero_shot(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Zero-shot accuracy pooled over a row's seeds: n = all answered examples, acc their mean, and its binomial
    standard error (None when a run has no zero-shot record)."""
    if not rows or not all(r.get("zero_shot") for r in rows):
        return None
    out = {}
    for task in rows[0]["zero_shot"]:
        n = sum(r["zero_shot"][task]["n"] for r in rows)
        acc = sum(r["zero_shot"][task]["acc"] * r["zero_shot"][task]["n"] for r in rows) / max(n, 1)
        out[task] = {"acc": acc, "n": n, "stderr": math.sqrt(acc * (1 - acc) / n) if n else None}
    return out
