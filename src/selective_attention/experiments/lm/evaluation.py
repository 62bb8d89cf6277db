"""What the LM study measures on a finished run beyond its validation curve: perplexity by length on long
documents, attention entropy by position and teacher-forced passkey retrieval (cached in ``EVAL_FILE``), and the
unigram floor of a corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from selective_attention.errors import UserError
from selective_attention.experiments import common
from selective_attention.experiments.lm.config import Config
from selective_attention.experiments.lm.runs import Run
from selective_attention.experiments.lm.stats import unigram_floor
from selective_attention.utils.device import choose_device

EVAL_FILE = "lm_eval.json"  # per-run evaluation beside run.json (skipped when present with the same settings)


def eval_settings(config: Config) -> dict[str, Any]:
    """The settings a run's EVAL_FILE was measured with: a change measures every run again."""
    return {
        "length_corpus": config.length_corpus,
        "lengths": [config.seq_len * m for m in config.length_multipliers],
        "length_windows": config.length_windows,
        "entropy_windows": config.entropy_windows,
        "split_seed": config.split_seed,
        "passkey_trials": config.passkey_trials,
    }


def _length_docs(config: Config, tokenizer: Any) -> list[list[int]]:
    from selective_attention.data.corpora import load_documents
    from selective_attention.evaluate.by_length import document_ids

    return document_ids(tokenizer, load_documents(config.length_corpus, "val", seed=config.split_seed))


def is_evaluated(run: Run, config: Config) -> bool:
    """The run's run.json and its EVAL_FILE with this study's settings are on disk: everything the tables read.
    True also for a run restored from its committed records without its final model (``results/<study>/runs``),
    so a fresh machine continues a study without training its finished runs again."""
    saved = common.saved_with(run.path / EVAL_FILE, eval_settings(config))
    return (run.path / "run.json").is_file() and saved is not None


def evaluate_run(run: Run, config: Config) -> dict[str, Any]:
    """Perplexity by length, attention entropy by position and teacher-forced passkey retrieval by length of a
    finished run (cached in EVAL_FILE)."""
    settings = eval_settings(config)
    return common.cached(run.path / EVAL_FILE, settings, lambda: _measure(run, config, settings["lengths"]))


def _measure(run: Run, config: Config, lengths: list[int]) -> dict[str, Any]:
    import torch

    from selective_attention.evaluate.by_length import length_distribution, length_windows, perplexity_by_length
    from selective_attention.evaluate.passkey import check_lengths, key_likelihood
    from selective_attention.evaluate.probe import dilution_curves

    model, tokenizer = load_final(run.path)
    model.to(choose_device("auto"))
    if config.passkey_trials:
        try:
            check_lengths(tokenizer, lengths)
        except UserError as e:
            raise UserError(f"{e}; set passkey_trials=0 to skip the passkey test") from None
    docs = _length_docs(config, tokenizer)
    by_length = perplexity_by_length(model, docs, lengths, max_windows=config.length_windows)
    wins = length_windows(docs, max(lengths), config.entropy_windows)
    measured = [dilution_curves(model, torch.tensor([w[:-1]], dtype=torch.long)) for w in wins]
    curves = [c for c in measured if c is not None]
    entropy = None
    if curves:
        # 5 decimals: a curve per position of every run lands in results.json, full float digits would triple it
        entropy = {
            "position": curves[0]["position"],
            "entropy": np.round(np.mean([c["entropy"] for c in curves], axis=0), 5).tolist(),
            "max_weight": np.round(np.mean([c["max_weight"] for c in curves], axis=0), 5).tolist(),
        }
    passkey = None
    if config.passkey_trials:
        # the prompt's fixed seed: every model of the study is asked the same keys at the same depths
        passkey = key_likelihood(model, tokenizer, lengths, n_trials=config.passkey_trials)["by_length"]
    return {
        "ppl_by_length": by_length,
        "attention_by_position": entropy,
        "passkey": passkey,
        "length_documents": length_distribution(docs),
    }


def load_final(run_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a finished run, whatever its method."""
    from transformers import AutoTokenizer

    from selective_attention.methods import load_model

    return load_model(run_dir / "final"), AutoTokenizer.from_pretrained(str(run_dir / "final"))


def unigram_ppl(corpus: str, config: Config) -> float:
    """Perplexity of the add-one unigram model of the train split on the validation tokens: the floor to beat."""
    from selective_attention.data.tokens import prepare

    data = prepare(corpus, "bpe", config.vocab_size, None, config.split_seed, None, splits=("train", "val"))
    return unigram_floor(data, config.eval_tokens)
