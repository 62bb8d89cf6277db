"""The registry of experiments and ``run_experiment``, which ``ssa experiment NAME`` (``cli.experiment``) drives.

An experiment module (registered in ``EXPERIMENTS``) defines:
    Config          a dataclass of its settings (defaults = the CPU-sized run)
    DEFAULT_SEEDS   how many seeds by default
    BUDGETS         (optional) named presets of Config overrides for ``--budget``, and BUDGET_SEEDS their seeds;
                    a Config with a ``budget`` field records the preset it ran under
    run(out, config, seeds, progress=True) -> dict   writes results.json, PNGs, summary.md; returns the results
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

from selective_attention.errors import UserError

# name -> (module, one-line help). Other parts (e.g. lm, ablations) register here.
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "markov": (
        "selective_attention.experiments.markov",
        "Figure 3: Markov chain on 8 tokens, vanilla vs query temperature (CE, l1, spikiness, ||W||)",
    ),
    "denoise": (
        "selective_attention.experiments.denoise",
        "value temperature on a denoising task vs naive averaging and the Bayes-optimal estimator",
    ),
    "dilution": (
        "selective_attention.experiments.dilution",
        "attention entropy / spikiness / max weight vs query position, small LMs, within and beyond T",
    ),
    "passkey": (
        "selective_attention.experiments.passkey_synthetic",
        "tiny models trained on passkey sequences at length L, tested at L, 2L, 4L and several depths",
    ),
    "norm": (
        "selective_attention.experiments.norm",
        "Lemma 1 in numbers: the smallest ||W_q W_k^T|| for targets of growing sparsity, vanilla vs SSA",
    ),
    "ablations": ("selective_attention.experiments.ablations", "temperatures on Q/K/V, token vs position, other rules"),
    "lm": (
        "selective_attention.experiments.lm",
        "LM study: vanilla vs SSA vs baselines from scratch, paired over seeds, perplexity by length (--budget)",
    ),
    "finetune-study": (
        "selective_attention.experiments.finetune_study",
        "a vanilla base of our own, pre-trained then fine-tuned: vanilla vs SSA vs temperatures only vs "
        "the official form vs a constant per head, paired over seeds (--budget quick|full)",
    ),
    "finetune": (
        "selective_attention.experiments.finetune",
        "SmolLM2-135M fine-tuned: vanilla vs convert + fine-tune vs temperatures only (--budget)",
    ),
}


def load(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name][0])


def budget_overrides(mod: ModuleType, budget: str | None) -> dict[str, Any]:
    """The Config overrides of a named budget (``--budget``); {} for None."""
    if budget is None:
        return {}
    budgets = getattr(mod, "BUDGETS", None)
    if not budgets:
        raise UserError(f"{mod.__name__.rsplit('.', 1)[-1]} has no budgets: drop --budget")
    if budget not in budgets:
        raise UserError(f"unknown budget {budget!r}; choose from {', '.join(budgets)}")
    return {**budgets[budget], "budget": budget}


def run_experiment(
    name: str,
    out: str | Path,
    seeds: int | list[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    budget: str | None = None,
    jobs: int = 1,
    tables_only: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Run experiment ``name`` into ``out``; ``seeds`` is a count (seeds seed..seed+N-1) or an explicit list;
    ``budget`` picks a preset of the experiment's Config and ``overrides`` replace fields on top of it; ``jobs``
    runs that many of its runs at once and ``tables_only`` rebuilds the tables from finished runs without running
    anything (experiments whose ``run`` takes them). Returns the results.json content."""
    mod = load(name)
    accepts = inspect.signature(mod.run).parameters
    if jobs != 1 and "jobs" not in accepts:
        raise UserError(f"{name} runs one thing at a time: drop --jobs")
    if tables_only and "tables_only" not in accepts:
        raise UserError(f"{name} cannot rebuild its tables without running: drop --tables-only")
    extra = {k: v for k, v in (("jobs", jobs), ("tables_only", tables_only)) if k in accepts}
    try:
        config = dataclasses.replace(mod.Config(), **{**budget_overrides(mod, budget), **overrides})
    except TypeError as e:
        raise UserError(f"{name}: {e}") from None
    if seeds is None:
        seeds = getattr(mod, "BUDGET_SEEDS", {}).get(budget, mod.DEFAULT_SEEDS)
    seed_list = list(range(seed, seed + seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise UserError("--seeds must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return mod.run(out, config, seed_list, progress=progress, **extra)
