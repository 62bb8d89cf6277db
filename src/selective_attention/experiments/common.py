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
from typing import TYPE_CHECKING, Any, Protocol

import torch

from selective_attention.errors import UserError
from selective_attention.utils.io import atomic_write, atomic_write_json, atomic_write_text, read_json

# Re-exported for the experiment modules that call them as common.*; the one implementation is utils.stats.
from selective_attention.utils.stats import mean_std
from selective_attention.utils.stats import methods_table as markdown_table  # noqa: F401

if TYPE_CHECKING:
    from selective_attention.train import TrainConfig


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
    is_instance = dataclasses.is_dataclass(config) and not isinstance(config, type)
    cfg = dataclasses.asdict(config) if is_instance else dict(config)
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

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(buf.getvalue())

    return atomic_write(path, write)


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
    """Zero-shot accuracy of a row over its seeds (None when a run has no zero-shot record): acc the mean over
    seeds, n the examples each seed answered and the binomial standard error over them. Every seed answers the same
    examples (the same task set and limit), so pooling them as seeds x n independent answers would shrink the error
    by sqrt(seeds) without any new example; a task whose seeds answered different numbers is an error."""
    if not rows or not all(r.get("zero_shot") for r in rows):
        return None
    out = {}
    for task in rows[0]["zero_shot"]:
        ns = {r["zero_shot"][task]["n"] for r in rows}
        if len(ns) != 1:
            raise UserError(f"zero-shot {task}: the seeds answered different numbers of examples ({sorted(ns)})")
        n = ns.pop()
        acc = sum(r["zero_shot"][task]["acc"] for r in rows) / len(rows)
        out[task] = {"acc": acc, "n": n, "stderr": math.sqrt(acc * (1 - acc) / n) if n else None}
    return out


# ------------------------------------------------------------------------------------- the studies' shared steps


class StudySettings(Protocol):
    """The fields of a study's Config that every one of its training runs shares."""

    seq_len: int
    batch_size: int
    eval_tokens: int
    checkpoint_every: int
    split_seed: int


def study_train_config(
    study: StudySettings,
    *,
    data: str,
    out: Path,
    seed: int,
    max_tokens: int,
    lr: float,
    eval_every: int,
    progress: bool = False,
    **fields: Any,
) -> TrainConfig:
    """The TrainConfig of one run of a study (the LM study, the fine-tuning study's base and fine-tunes): the
    study's window, batch, validation tokens, checkpoint interval and split, one checkpoint kept, the run's own
    data, seed, length, rate and validation interval, and ``fields`` (its method; the model size and vocabulary of
    a run from scratch, the base of a fine-tune). A field left out keeps TrainConfig's default, and what is set
    here decides whether a saved run is resumed, so a study's runs must keep being built the same way."""
    from selective_attention.train import TrainConfig

    return TrainConfig(
        data=data,
        max_tokens=max_tokens,
        seed=seed,
        out=str(out),
        seq_len=study.seq_len,
        batch_size=study.batch_size,
        lr=lr,
        eval_every=eval_every,
        eval_tokens=study.eval_tokens,
        checkpoint_every=study.checkpoint_every,
        keep_checkpoints=1,
        split_seed=study.split_seed,
        progress=progress,
        **fields,
    )


def saved_with(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluation saved at ``path`` by ``cached`` when it was made with these ``settings``, else None."""
    if path.is_file():
        saved = read_json(path, "a saved evaluation")
        if isinstance(saved, dict) and saved.get("settings") == settings:
            return saved
    return None


def cached(path: Path, settings: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """An evaluation saved as ``{"settings": settings, **record}`` at ``path``: the saved one when it was made with
    the same ``settings``, else ``compute()``'s record, saved there (different settings are measured again)."""
    saved = saved_with(path, settings)
    if saved is not None:
        return saved
    result = {"settings": settings, **compute()}
    atomic_write_json(path, result)
    return result


def zero_shot_accuracy(
    model: Any, tokenizer: Any, tasks: Sequence[str], limit: int, max_length: int | None = None
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy through lm-eval, {task: {acc, n, stderr}} with the binomial standard error
    sqrt(acc (1 - acc) / n) (None without examples); ``limit`` examples per task, 0 = the full set; {} for no
    tasks."""
    from selective_attention.evaluate import zero_shot

    result: dict[str, dict[str, Any]] = {}
    if not tasks:
        return result
    for task, res in zero_shot(model, tokenizer, list(tasks), limit=limit or None, max_length=max_length).items():
        acc, n = float(res["acc"]), int(res.get("n", 0) or 0)
        result[task] = {"acc": acc, "n": n, "stderr": math.sqrt(acc * (1 - acc) / n) if n else None}
    return result
