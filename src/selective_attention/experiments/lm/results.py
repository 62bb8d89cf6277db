"""The LM study's results, rebuilt from the run directories on disk: one record per finished run and the
results.json content (a study in progress lists its pending runs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError
from selective_attention.experiments.lm.config import PAIRING_FIELDS, Config
from selective_attention.experiments.lm.evaluation import EVAL_FILE, unigram_ppl
from selective_attention.experiments.lm.runs import Run, plan
from selective_attention.experiments.lm.stats import (
    across_packings,
    aggregate,
    choose,
    confirmation,
    contrasts,
    dilution,
    late_improvement,
)
from selective_attention.utils.io import read_json


def validation_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(tokens, val_ppl) of the validations logged in metrics.jsonl."""
    from selective_attention.train.rundir import read_metrics

    vals = [m for m in read_metrics(run_dir / "metrics.jsonl") if "val_ppl" in m]
    return [float(m["tokens"]) for m in vals], [float(m["val_ppl"]) for m in vals]


def run_record(run: Run, train_length: int) -> dict[str, Any] | None:
    """What one finished run measured, read from its directory (None while it is unfinished)."""
    if not (run.path / "run.json").is_file() or not (run.path / EVAL_FILE).is_file():
        return None
    info = read_json(run.path / "run.json", "a finished run's run.json")
    ev = read_json(run.path / EVAL_FILE, "a finished run's evaluation")
    tokens, ppl = validation_curve(run.path)
    return {
        "corpus": run.corpus,
        "method": run.method,
        "seed": run.seed,
        "dir": str(run.path),
        "val_ppl": float(info["final_val_ppl"]),
        "val_loss": float(info["final_val_loss"]),
        "tokens_per_s": float(info["tokens_per_s"]),
        "train_time_s": float(info["train_time_s"]),
        "tokens": int(info["tokens"]),
        "parameters": info["parameters"],
        "curve": {"tokens": tokens, "ppl": ppl},
        "ppl_by_length": {k: v["ppl"] for k, v in ev["ppl_by_length"].items()},
        "windows_by_length": {k: v["windows"] for k, v in ev["ppl_by_length"].items()},
        "loss_by_position": {k: v["loss_by_position"] for k, v in ev["ppl_by_length"].items()},
        "attention_by_position": ev["attention_by_position"],
        "length_documents": ev["length_documents"],
        "dilution": dilution(ev["attention_by_position"], train_length),
        "passkey_gain": {k: v["gain"] for k, v in ev["passkey"].items()} if ev.get("passkey") else None,
        "late_improvement_percent": late_improvement(ppl, tokens) if len(ppl) > 1 else None,
        "temperatures": info.get("temperatures"),
    }


def collect(out: Path, config: Config, seeds: list[int]) -> dict[str, Any]:
    """Rebuild results from the run directories on disk (finished runs only)."""
    runs = plan(out, config, seeds)
    records = [r for r in (run_record(run, config.seq_len) for run in runs) if r is not None]
    corpora: dict[str, Any] = {}
    for corpus in config.corpora:
        methods = aggregate(records, corpus, config.seq_len)
        if methods:
            corpora[corpus] = {"methods": methods, "unigram_ppl": unigram_ppl(corpus, config)}
    finished = {(r["corpus"], r["method"], r["seed"]) for r in records}
    pending = [f"{r.corpus}/{r.method}-seed{r.seed}" for r in runs if (r.corpus, r.method, r.seed) not in finished]
    primary = corpora.get(config.corpora[0], {}).get("methods", {})
    results = {
        "experiment": "lm",
        "config": dataclasses.asdict(config),
        "seeds": list(seeds),
        "methods": primary,
        "corpora": corpora,
        "runs": records,
        "pending": pending,
        "complete": not pending,
    }
    if config.budget == "search":
        results["choice"] = choose(primary)
        results["contrasts"] = contrasts(records, config.corpora[0])
    if config.budget == "confirm" and config.chosen:
        results["confirmation"] = confirmation(records, config.chosen, config.corpora)
    if config.stitched_from:
        results["across_packings"] = _across_packings(config, records)
    return results


def _across_packings(config: Config, records: list[dict[str, Any]]) -> dict[str, Any]:
    """This packed study's runs paired seed by seed with the stitched study in ``config.stitched_from`` (read from
    its results.json), on the first corpus; refused when the two studies did not train alike."""
    path = Path(config.stitched_from) / "results.json"
    if not path.is_file():
        raise UserError(f"stitched_from: no results.json in {config.stitched_from} (run or rebuild that study first)")
    other = read_json(path, "the stitched study's results.json")
    theirs = other["config"]
    if theirs.get("packing", "stitched") != "stitched":
        raise UserError(f"stitched_from: {config.stitched_from} is not a stitched study")
    differ = [f for f in PAIRING_FIELDS if theirs.get(f) != getattr(config, f)]
    if differ:
        raise UserError(
            f"stitched_from: {config.stitched_from} trained with other {', '.join(differ)}; its runs do not pair "
            "with these"
        )
    corpus = config.corpora[0]
    return {
        "stitched_from": config.stitched_from,
        "corpus": corpus,
        "rows": across_packings(records, other["runs"], corpus),
    }
