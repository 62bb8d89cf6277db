"""The LM study's runs: where each lives (``OUT/runs/<corpus>/<method>-seed<S>``), the order they train in and the
TrainConfig each trains with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selective_attention.experiments import common
from selective_attention.experiments.lm.config import (
    DEMO_SSA,
    PRIMARY,
    Config,
    corpus_offset,
    corpus_rows,
    method_settings,
)

if TYPE_CHECKING:
    from selective_attention.train import TrainConfig


@dataclass(frozen=True)
class Run:
    corpus: str
    method: str
    seed: int
    path: Path


def label(corpus: str) -> str:
    """A folder/file-safe name of a corpus: its own name (wiki, sotu) or the stem of a corpus file."""
    return corpus if "/" not in corpus and "." not in corpus else Path(corpus).stem


def plan(out: Path, config: Config, seeds: list[int]) -> list[Run]:
    """Every run of the study in the order it trains: first vanilla and SSA on every corpus, seed by seed (the
    headline comparison), then the other baselines seed by seed, so an interrupted study already holds complete
    paired comparisons of what matters most."""

    def runs_where(keep: Callable[[str], bool]) -> list[tuple[str, str, int]]:
        return [
            (corpus, method, seed + corpus_offset(config, i))
            for seed in seeds
            for i, corpus in enumerate(config.corpora)
            for method in corpus_rows(config, i)
            if keep(method)
        ]

    first = (*PRIMARY, DEMO_SSA, config.chosen)  # the headline pair (a demo's, a confirmation's: vanilla and its SSA)
    ordered = runs_where(lambda m: m in first) + runs_where(lambda m: m not in first)
    return [Run(c, m, s, out / "runs" / label(c) / f"{m}-seed{s}") for c, m, s in ordered]


def is_trained(run: Run) -> bool:
    """A finished training run: its run.json and final model are written last, after every checkpoint."""
    return (run.path / "run.json").is_file() and (run.path / "final" / "config.json").is_file()


def train_config(run: Run, config: Config, progress: bool) -> TrainConfig:
    """The run trained from scratch: the study's model size and vocabulary, the row's method settings."""
    return common.study_train_config(
        config,
        data=run.corpus,
        out=run.path,
        seed=run.seed,
        max_tokens=config.max_tokens,
        lr=config.lr,
        eval_every=config.eval_every,
        progress=progress,
        size=config.size,
        vocab_size=config.vocab_size,
        packing=config.packing,
        **method_settings(run.method, config.lr),
    )
