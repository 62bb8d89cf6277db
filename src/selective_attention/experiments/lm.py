"""``ssa experiment lm --budget quick|default|full|search|confirm``: does SSA make a better language model? A resumable
study. ``search`` is the pre-registered configuration search (``SEARCH``) and ``confirm`` trains its choice
(``--set chosen=LABEL``) at the full budget on seeds it was not chosen on.

Design (the ``full`` budget; ``default`` is its one-hour subset, ``quick`` a CI-sized check of the machinery):
- model ``study``: a Llama-style body-heavy model (d 192, 4 layers, 6 heads, ffn 512) with a 2,048-token BPE
  trained on the corpus, so the attention/MLP body holds ~82 % of the parameters (the ``tiny`` model of the old
  table was ~70 % embedding); sequence length 512;
- corpora: ``wiki`` (Wikipedia lead paragraphs) and ``sotu`` (State-of-the-Union speeches, long documents);
  vanilla vs SSA on both, every baseline on the first corpus;
- methods: vanilla; SSA (shared, query + value, the default); SSA mlp (~5 % parameters); SSA position-only (the
  official code's form: c log p on the query); Scalable-Softmax; Llama-4 attention temperature tuning; gated
  attention (a per-head sigmoid gate on the attention output). Same initial weights, same data order per seed;
- every final model is also evaluated at 1x, 2x and 4x its training length on long documents (``length_corpus``
  validation split, each window inside one document): perplexity by length, loss by position, and the
  attention entropy by position at 4x.

Runs live in ``OUT/runs/<corpus>/<method>-seed<S>/`` (ordinary ``ssa train`` run directories, checkpointed every
``checkpoint_every`` steps). Rerunning the same command skips finished runs, resumes unfinished ones exactly and
rebuilds every table from what is on disk, so the study can be run over several sittings.

Statistics: mean +- sample std over seeds; the paired difference to vanilla per seed (same seed = same initial
weights and data order) with a 95 % Student-t interval; a method wins (loses) only when that interval lies
entirely below (above) zero. Tokens-to-target: the tokens a method needs to reach vanilla's final validation
perplexity (same seed). Equal wall-clock: a method's validation perplexity after vanilla's training time,
interpolated on its own curve (its learning rate has then not decayed yet, which favours vanilla).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selective_attention.errors import UserError
from selective_attention.experiments import common
from selective_attention.utils.device import choose_device
from selective_attention.utils.stats import first_crossing, paired, short_count

DEFAULT_SEEDS = 3
METHODS = ("vanilla", "ssa", "ssa-mlp", "ssa-pos", "ssmax", "llama4", "gated")  # the full budget's rows

# The pre-registered configuration search (``--budget search``; written down before any of its runs): at the
# default budget on wiki, seeds 0-2, vanilla plus SSA (query + value, token + position terms) over start c in
# {0 (identity), 0.01, 0.1, 0.5} x temperature lr in {1x, 10x the base lr}; position-only (query, identity start),
# token-only (query + value) and query-only (token + position, identity start) at each lr; and the official form
# at 10x (its c = exp(-exp(beta)) cannot leave ~0 at 1x). Choice rule: the lowest mean paired difference of val
# ppl to vanilla over the three seeds; configurations within TIE_MARGIN percentage points of it tie, and a tie goes
# to the one with fewer new parameters (then the lower mean). The confirmation (``--budget confirm``) then trains
# the chosen one at the full budget on wiki seeds 3-5 and sotu seeds 0-2 against vanilla, ssmax and llama4.
SEARCH_STARTS = (0.0, 0.01, 0.1, 0.5)
SEARCH_LR_FACTORS = (1, 10)
TIE_MARGIN = 0.5  # percentage points


def _search_labels() -> tuple[str, ...]:
    full = [f"ssa-c{c:g}-t{f}" for c in SEARCH_STARTS for f in SEARCH_LR_FACTORS]
    parts = [f"{kind}-t{f}" for kind in ("ssa-pos-c0", "ssa-tok", "ssa-q-c0") for f in SEARCH_LR_FACTORS]
    return ("vanilla", *full, *parts, "ssa-official-t10")


SEARCH = _search_labels()
CHOSEN = "chosen"  # stands for Config.chosen in a budget's rows
CONFIRM_ROWS = ("vanilla", CHOSEN, "ssmax", "llama4")
PRIMARY = ("vanilla", "ssa")  # the headline comparison, trained first
EVAL_FILE = "lm_eval.json"  # per-run evaluation beside run.json (skipped when present with the same settings)


@dataclass
class Config:
    budget: str = "default"
    size: str = "study"
    vocab_size: int = 2048
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 2e-3
    max_tokens: int = 1_000_000
    eval_every: int = 25  # optimizer steps between validations (the curves)
    eval_tokens: int = 65_536
    checkpoint_every: int = 25  # a kill -9 loses at most this many steps
    corpora: tuple[str, ...] = ("wiki", "sotu")
    methods: tuple[str, ...] = ("vanilla", "ssa")  # on the first corpus
    other_methods: tuple[str, ...] = ("vanilla", "ssa")  # on the other corpora
    length_corpus: str = "sotu"
    length_multipliers: tuple[int, ...] = (1, 2, 4)
    length_windows: int = 16  # windows per length
    entropy_windows: int = 2  # windows of the longest length for attention entropy by position
    passkey_trials: int = 4  # teacher-forced passkey trials per length and depth (5 depths); 0 = no passkey test
    split_seed: int = 0
    seed_offsets: tuple[int, ...] = ()  # per corpus: its seeds are the study's seeds + this (confirm: wiki 3-5)
    chosen: str = ""  # confirm: the search's choice (a SEARCH label), trained against vanilla, ssmax and llama4


BUDGETS: dict[str, dict[str, Any]] = {
    # CI: the whole machinery on a tiny model in a few minutes
    "quick": {
        "size": "tiny",
        "vocab_size": 512,
        "seq_len": 64,
        "batch_size": 4,
        "max_tokens": 16_384,
        "eval_every": 16,
        "eval_tokens": 4_096,
        "checkpoint_every": 32,
        "corpora": ("wiki",),
        "methods": ("vanilla", "ssa", "gated"),
        "length_windows": 4,
        "entropy_windows": 1,
        "passkey_trials": 0,
    },
    # about an hour on 2 cores: vanilla vs SSA on both corpora
    "default": {},
    # the study: every baseline, several CPU-hours, meant to be run over several sittings
    # (validations every 50 steps: 20 points per curve, and the validation passes cost ~10 % of training, not ~20 %)
    "full": {"max_tokens": 4_000_000, "methods": METHODS, "eval_every": 50, "length_windows": 32},
    # the pre-registered configuration search (see SEARCH): default budget, wiki only, 3 seeds; no passkey and a
    # lighter by-length evaluation (the choice rule reads validation perplexity only)
    "search": {"corpora": ("wiki",), "methods": SEARCH, "passkey_trials": 0, "length_windows": 8, "entropy_windows": 1},
    # the confirmation of the search's choice (``--set chosen=LABEL``): the full budget on wiki seeds 3-5 and sotu
    # seeds 0-2 (seeds it was not chosen on), against vanilla, Scalable-Softmax and Llama-4 tuning
    "confirm": {
        "max_tokens": 4_000_000,
        "eval_every": 50,
        "length_windows": 32,
        "corpora": ("wiki", "sotu"),
        "methods": CONFIRM_ROWS,
        "other_methods": CONFIRM_ROWS,
        "seed_offsets": (3, 0),
    },
    # `ssa demo`: the study's design (body-heavy model, 512 tokens, long documents) at <= 10 minutes on 2 cores
    "demo": {
        "corpora": ("sotu",),
        "max_tokens": 400_000,
        "eval_every": 20,
        "eval_tokens": 32_768,
        "checkpoint_every": 50,
        "length_windows": 8,
        "entropy_windows": 1,
        "passkey_trials": 0,
    },
    "demo-quick": {
        "corpora": ("sotu",),
        "max_tokens": 81_920,
        "eval_every": 5,
        "eval_tokens": 16_384,
        "checkpoint_every": 50,
        "length_windows": 4,
        "entropy_windows": 1,
        "passkey_trials": 0,
    },
}
BUDGET_SEEDS = {"quick": 2, "default": 3, "full": 3, "demo": 2, "demo-quick": 1, "search": 3, "confirm": 3}


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

    def runs_where(keep) -> list[tuple[str, str, int]]:
        return [
            (corpus, method, seed + corpus_offset(config, i))
            for seed in seeds
            for i, corpus in enumerate(config.corpora)
            for method in corpus_rows(config, i)
            if keep(method)
        ]

    first = (*PRIMARY, config.chosen)  # the headline pair (a confirmation's: vanilla and the chosen row)
    ordered = runs_where(lambda m: m in first) + runs_where(lambda m: m not in first)
    return [Run(c, m, s, out / "runs" / label(c) / f"{m}-seed{s}") for c, m, s in ordered]


def corpus_rows(config: Config, corpus_index: int) -> tuple[str, ...]:
    """The rows trained on the corpus at ``corpus_index`` (``chosen`` filled in)."""
    names = config.methods if corpus_index == 0 else config.other_methods
    return tuple(config.chosen if m == CHOSEN else m for m in names)


def corpus_offset(config: Config, corpus_index: int) -> int:
    return config.seed_offsets[corpus_index] if corpus_index < len(config.seed_offsets) else 0


def is_trained(run: Run) -> bool:
    """A finished training run: its run.json and final model are written last, after every checkpoint."""
    return (run.path / "run.json").is_file() and (run.path / "final" / "config.json").is_file()


def method_settings(method: str, lr: float = 2e-3) -> dict[str, Any]:
    """TrainConfig fields of one study row: a method name, or a search label ``<form>[-c<start>]-t<factor>``
    (temperature lr = factor x ``lr``). ``ssa`` / ``ssa-mlp`` start at c = 0.5 (scratch)."""
    from selective_attention.config import SSAConfig

    ssa = {"ssa": SSAConfig(init="scratch"), "ssa-mlp": SSAConfig(sharing="mlp", init="scratch")}
    if method in ssa:
        return {"attention": "ssa", "ssa": ssa[method]}
    if method in SEARCH:
        return _search_settings(method, lr)
    if method in METHODS:
        return {"attention": {"ssa-pos": "ssa-pos-head"}.get(method, method)}
    from selective_attention.methods import METHODS as REGISTRY

    if method in REGISTRY:
        return {"attention": method}
    raise UserError(f"unknown method {method!r}; choose from {', '.join(dict.fromkeys((*METHODS, *SEARCH)))}")


def _search_settings(label: str, lr: float) -> dict[str, Any]:
    from selective_attention.config import SSAConfig

    if label == "vanilla":
        return {"attention": "vanilla"}
    form, factor = label.rsplit("-t", 1)
    t_lr = {"temperature_lr": lr * int(factor)}
    if form == "ssa-official":
        return {"attention": "ssa-official", **t_lr}
    kind, c = ("ssa-tok", None) if form == "ssa-tok" else (form.rsplit("-c", 1)[0], float(form.rsplit("-c", 1)[1]))
    fields = {
        "ssa": {},
        "ssa-pos": {"token_aware": False, "value": False},
        "ssa-tok": {"position_aware": False},
        "ssa-q": {"value": False},
    }[kind]
    return {"attention": "ssa", "ssa": SSAConfig(init="identity", position_init=c, **fields), **t_lr}


def choose(methods: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The search's pre-registered choice rule (see SEARCH) over aggregated rows with a paired difference."""
    rows = [(m, d) for m, d in methods.items() if m != "vanilla" and d.get("paired_percent")]
    if not rows:
        return None
    best = min(d["paired_percent"]["mean"] for _, d in rows)
    tied = [(m, d) for m, d in rows if d["paired_percent"]["mean"] <= best + TIE_MARGIN]
    m, d = min(tied, key=lambda md: (md[1]["new_parameters"], md[1]["paired_percent"]["mean"]))
    return {
        "method": m,
        "paired_percent": d["paired_percent"],
        "new_parameters": d["new_parameters"],
        "tied_with": [t for t, _ in tied if t != m],
        "rule": f"lowest mean paired difference; within {TIE_MARGIN} pp a tie, broken by fewer new parameters",
    }


def _train_config(run: Run, config: Config, progress: bool):
    from selective_attention.train import TrainConfig

    return TrainConfig(
        data=run.corpus,
        size=config.size,
        max_tokens=config.max_tokens,
        seed=run.seed,
        out=str(run.path),
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        lr=config.lr,
        eval_every=config.eval_every,
        eval_tokens=config.eval_tokens,
        vocab_size=config.vocab_size,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=1,
        split_seed=config.split_seed,
        progress=progress,
        **method_settings(run.method, config.lr),
    )


def validate(config: Config, seeds: list[int]) -> None:
    if config.budget not in BUDGETS:
        raise UserError(f"unknown budget {config.budget!r}; choose from {', '.join(BUDGETS)}")
    if not config.corpora:
        raise UserError("no corpora to run")
    if CHOSEN in (*config.methods, *config.other_methods) and config.chosen not in SEARCH:
        raise UserError(
            f"--budget {config.budget} confirms the search's choice: pass --set chosen=LABEL with a "
            f"search label (the 'choice' of the search's results.json), got {config.chosen!r}"
        )
    for i in range(len(config.corpora)):
        for m in corpus_rows(config, i):
            method_settings(m)
    if "vanilla" not in config.methods:
        raise UserError("the study compares every method with vanilla: keep vanilla in methods")
    if not config.length_multipliers or min(config.length_multipliers) < 1:
        raise UserError("length_multipliers must be positive integers")
    if config.passkey_trials < 0:
        raise UserError("passkey_trials must be >= 0 (0 = no passkey test)")


# ------------------------------------------------------------------------------------------------- evaluation


def _eval_settings(config: Config) -> dict[str, Any]:
    return {
        "length_corpus": config.length_corpus,
        "lengths": [config.seq_len * m for m in config.length_multipliers],
        "length_windows": config.length_windows,
        "entropy_windows": config.entropy_windows,
        "split_seed": config.split_seed,
        "passkey_trials": config.passkey_trials,
    }


def _length_docs(config: Config, tokenizer) -> list[list[int]]:
    from selective_attention.data.corpora import load_documents
    from selective_attention.evaluate.by_length import document_ids

    return document_ids(tokenizer, load_documents(config.length_corpus, "val", seed=config.split_seed))


def evaluate_run(run: Run, config: Config) -> dict[str, Any]:
    """Perplexity by length, attention entropy by position and teacher-forced passkey retrieval by length of a
    finished run (cached in EVAL_FILE)."""
    import torch

    from selective_attention.evaluate.by_length import length_distribution, length_windows, perplexity_by_length
    from selective_attention.evaluate.passkey import check_lengths, key_likelihood
    from selective_attention.evaluate.probe import dilution_curves

    settings = _eval_settings(config)
    path = run.path / EVAL_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved
    model, tokenizer = load_final(run.path)
    model.to(choose_device("auto"))
    if config.passkey_trials:
        try:
            check_lengths(tokenizer, settings["lengths"])
        except UserError as e:
            raise UserError(f"{e}; set passkey_trials=0 to skip the passkey test") from None
    docs = _length_docs(config, tokenizer)
    by_length = perplexity_by_length(model, docs, settings["lengths"], max_windows=config.length_windows)
    longest = max(settings["lengths"])
    wins = length_windows(docs, longest, config.entropy_windows)
    curves = [dilution_curves(model, torch.tensor([w[:-1]], dtype=torch.long)) for w in wins]
    curves = [c for c in curves if c is not None]
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
        passkey = key_likelihood(model, tokenizer, settings["lengths"], n_trials=config.passkey_trials)["by_length"]
    result = {
        "settings": settings,
        "ppl_by_length": by_length,
        "attention_by_position": entropy,
        "passkey": passkey,
        "length_documents": length_distribution(docs),
    }
    from selective_attention.utils.io import atomic_write_json

    atomic_write_json(path, result)
    return result


def load_final(run_dir: Path):
    """(model, tokenizer) of a finished run, whatever its method."""
    from transformers import AutoTokenizer

    from selective_attention.methods import load_model

    return load_model(run_dir / "final"), AutoTokenizer.from_pretrained(str(run_dir / "final"))


def unigram_ppl(corpus: str, config: Config) -> float:
    """Perplexity of the add-one unigram model of the train split on the validation tokens: the floor to beat."""
    from selective_attention.data.tokens import prepare

    data = prepare(corpus, "bpe", config.vocab_size, None, config.split_seed, None, splits=("train", "val"))
    return unigram_floor(data, config.eval_tokens)


def unigram_floor(data, eval_tokens: int) -> float:
    """The add-one unigram perplexity of a tokenised corpus's train split on its first ``eval_tokens`` validation
    targets (the validation a run scores)."""
    train, val = np.asarray(data.tokens("train")), np.asarray(data.tokens("val"))[: eval_tokens + 1]
    counts = np.bincount(train, minlength=len(data.tokenizer)).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[val[1:]].mean()))


# ------------------------------------------------------------------------------------------------- statistics


def _curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(tokens, val_ppl) of the validations logged in metrics.jsonl."""
    from selective_attention.train.rundir import read_metrics

    vals = [m for m in read_metrics(run_dir / "metrics.jsonl") if "val_ppl" in m]
    return [float(m["tokens"]) for m in vals], [float(m["val_ppl"]) for m in vals]


def tokens_to_reach(tokens: list[float], ppl: list[float], target: float) -> float | None:
    """First token count at which the curve reaches ``target`` (log-linear interpolation), None if never."""
    return first_crossing(tokens, ppl, target, log_y=True)


def ppl_at_tokens(tokens: list[float], ppl: list[float], at: float) -> float:
    """The curve's perplexity at ``at`` tokens (log-linear between validations; clamped to the ends)."""
    if at >= tokens[-1]:
        return ppl[-1]
    if at <= tokens[0]:
        return ppl[0]
    j = int(np.searchsorted(tokens, at))
    frac = (at - tokens[j - 1]) / (tokens[j] - tokens[j - 1])
    return math.exp(math.log(ppl[j - 1]) + frac * (math.log(ppl[j]) - math.log(ppl[j - 1])))


def dilution(attention: dict[str, list[float]] | None, train_length: int) -> dict[str, float] | None:
    """Mean attention entropy and max weight over the query positions within the training length and beyond it
    (no ``*_beyond`` keys when the windows stop at the training length)."""
    if not attention:
        return None
    pos = np.asarray(attention["position"])
    out = {}
    for key in ("entropy", "max_weight"):
        v = np.asarray(attention[key])
        out[f"{key}_within"] = float(v[pos <= train_length].mean())
        if (pos > train_length).any():
            out[f"{key}_beyond"] = float(v[pos > train_length].mean())
    return out


def late_improvement(ppl: list[float], tokens: list[float]) -> float:
    """Percent by which validation perplexity fell over the last 20 % of training tokens (the plateau criterion:
    < 2 % means more tokens would hardly help)."""
    return 100 * (1 - ppl[-1] / ppl_at_tokens(tokens, ppl, 0.8 * tokens[-1]))


def _run_record(run: Run, train_length: int) -> dict[str, Any] | None:
    """What one finished run measured, read from its directory (None while it is unfinished)."""
    if not (run.path / "run.json").is_file() or not (run.path / EVAL_FILE).is_file():
        return None
    info = json.loads((run.path / "run.json").read_text())
    ev = json.loads((run.path / EVAL_FILE).read_text())
    tokens, ppl = _curve(run.path)
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


def temperature_row(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where a row's temperatures ended over its seeds: the temperature lr and its bound on c's movement, c at the
    start and at the end (mean, min, max over seeds, layers and heads), the token term's spread, whether they moved
    (None for rows without temperature parameters, or runs from before the record existed)."""
    recs = [r["temperatures"] for r in runs if r.get("temperatures")]
    if len(recs) != len(runs) or not any(rec["modules"] for rec in recs):
        return None
    cs = [v for rec in recs for m in rec["modules"] for v in m.get("c", [])]
    reach = [m["c_reach"] for rec in recs for m in rec["modules"] if "c_reach" in m]
    start = [m["c_start"] for rec in recs for m in rec["modules"] if "c_start" in m]
    spread = {
        t: float(np.mean([np.mean(rec["token_spread"][t]) for rec in recs if rec.get("token_spread")]))
        for t in ("query", "value")
        if all(rec.get("token_spread") for rec in recs)
    }
    return {
        "lr": recs[0]["lr"],
        "lr_sum": recs[0]["lr_sum"],
        "c_reach": reach[0] if reach else None,
        "c_start": start[0] if start else None,
        "c_end": {"mean": float(np.mean(cs)), "min": float(np.min(cs)), "max": float(np.max(cs))} if cs else None,
        "token_spread": spread or None,
        "moved": all(rec["moved"] for rec in recs),
    }


def aggregate(records: list[dict[str, Any]], corpus: str) -> dict[str, dict[str, Any]]:
    """{method: {...}} for one corpus, from the finished runs' records."""
    rows = [r for r in records if r["corpus"] == corpus]
    vanilla = {r["seed"]: r for r in rows if r["method"] == "vanilla"}
    methods: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        mean, std = common.mean_std([r["val_ppl"] for r in runs])
        d: dict[str, Any] = {
            "val_ppl": mean,
            "val_ppl_std": std,
            "seeds": [r["seed"] for r in runs],
            "val_ppl_per_seed": [r["val_ppl"] for r in runs],
            "tokens_per_s": common.mean_std([r["tokens_per_s"] for r in runs])[0],
            "new_parameters": int(runs[0]["parameters"]["new"]),
            "parameters": int(runs[0]["parameters"]["total"]),
            "parameter_percent": float(runs[0]["parameters"]["percent"]),
        }
        by_length = {L: common.mean_std([r["ppl_by_length"][L] for r in runs]) for L in runs[0]["ppl_by_length"]}
        lengths = list(by_length)
        d["ppl_by_length"] = {L: m for L, (m, _) in by_length.items()}
        d["ppl_by_length_std"] = {L: sd for L, (_, sd) in by_length.items()}
        d["temperatures"] = temperature_row(runs)
        late = [r["late_improvement_percent"] for r in runs if r["late_improvement_percent"] is not None]
        d["late_improvement_percent"] = common.mean_std(late)[0] if late else None
        if all(r["dilution"] for r in runs):
            d["dilution"] = {k: common.mean_std([r["dilution"][k] for r in runs])[0] for k in runs[0]["dilution"]}
        if all(r["passkey_gain"] for r in runs):
            d["passkey_gain"] = {
                L: common.mean_std([r["passkey_gain"][L] for r in runs])[0] for L in runs[0]["passkey_gain"]
            }
        pairs = [(r, vanilla[r["seed"]]) for r in runs if r["seed"] in vanilla]
        if method != "vanilla" and pairs:
            if all(
                "entropy_beyond" in (r["dilution"] or {}) and "entropy_beyond" in (v["dilution"] or {})
                for r, v in pairs
            ):
                d["paired_entropy_beyond"] = paired(
                    [r["dilution"]["entropy_beyond"] - v["dilution"]["entropy_beyond"] for r, v in pairs]
                )
            if all(r["passkey_gain"] and v["passkey_gain"] for r, v in pairs):
                d["paired_passkey_gain"] = {
                    L: paired([r["passkey_gain"][L] - v["passkey_gain"][L] for r, v in pairs])
                    for L in pairs[0][0]["passkey_gain"]
                }
            d["paired_percent"] = paired([100 * (r["val_ppl"] - v["val_ppl"]) / v["val_ppl"] for r, v in pairs])
            d["paired_percent_by_length"] = {
                L: paired(
                    [100 * (r["ppl_by_length"][L] - v["ppl_by_length"][L]) / v["ppl_by_length"][L] for r, v in pairs]
                )
                for L in lengths
            }
            speedups, equal_time = [], []
            for r, v in pairs:
                # both sides measured the same way: the first time each curve reaches vanilla's final ppl
                reach = tokens_to_reach(r["curve"]["tokens"], r["curve"]["ppl"], v["val_ppl"])
                own = tokens_to_reach(v["curve"]["tokens"], v["curve"]["ppl"], v["val_ppl"]) or v["tokens"]
                speedups.append(None if reach is None else own / reach)
                at = v["train_time_s"] * r["tokens_per_s"]  # the method's tokens after vanilla's training time
                equal_time.append(
                    100 * (ppl_at_tokens(r["curve"]["tokens"], r["curve"]["ppl"], at) - v["val_ppl"]) / v["val_ppl"]
                )
            reached = [s for s in speedups if s is not None]
            d["speedup"] = common.mean_std(reached)[0] if len(reached) == len(speedups) else None
            d["speedup_reached"] = f"{len(reached)}/{len(speedups)}"
            d["speedup_per_seed"] = speedups
            d["paired_percent_equal_time"] = paired(equal_time)
        methods[method] = d
    return methods


def collect(out: Path, config: Config, seeds: list[int]) -> dict[str, Any]:
    """Rebuild results from the run directories on disk (finished runs only)."""
    runs = plan(out, config, seeds)
    records = [r for r in (_run_record(run, config.seq_len) for run in runs) if r is not None]
    corpora: dict[str, Any] = {}
    for corpus in config.corpora:
        methods = aggregate(records, corpus)
        if methods:
            corpora[corpus] = {"methods": methods, "unigram_ppl": unigram_ppl(corpus, config)}
    finished = {(r["corpus"], r["method"], r["seed"]) for r in records}
    pending = [f"{r.corpus}/{r.method}-seed{r.seed}" for r in runs if (r.corpus, r.method, r.seed) not in finished]
    primary = corpora.get(config.corpora[0], {}).get("methods", {})
    out_ = {
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
        out_["choice"] = choose(primary)
    return out_


# ------------------------------------------------------------------------------------------------- run


def _train_and_evaluate(run_: Run, config: Config, progress: bool, skip_busy: bool) -> str:
    """Train (or resume) one run and evaluate it: "done", "stopped" (stop_at_step) or "busy" (``skip_busy``: another
    process holds the run, so leave it to that process)."""
    from selective_attention.train import train
    from selective_attention.train.lock import RunInUse, RunLock

    try:
        if not is_trained(run_):
            info = train(_train_config(run_, config, progress=progress))
            if "stopped_at_step" in info:  # stopped on purpose (stop_at_step): the next invocation resumes it
                return "stopped"
        lock = RunLock(run_.path).acquire()  # the evaluation writes into the run directory too
    except RunInUse:
        if skip_busy:
            return "busy"
        raise
    try:
        evaluate_run(run_, config)
    finally:
        lock.release()
    return "done"


def _worker(out: Path, config: Config, seeds: list[int], threads: int, parent: int) -> None:
    """One of ``jobs`` processes: walk the plan, take every run no other process holds. It stops with the study
    (``utils.parent``): an orphan would go on training while holding its run's lock."""
    import sys

    from selective_attention.utils import parent as parent_process

    if not parent_process.follow(parent):  # the study died while this process was starting
        return
    import torch

    torch.set_num_threads(threads)

    def say(r: Run, what: str) -> None:
        print(
            f"lm study [worker {os.getpid()}]: {r.corpus}/{r.method}-seed{r.seed} {what}", file=sys.stderr, flush=True
        )

    for r in plan(out, config, seeds):
        if parent_process.gone():  # the study was stopped: do not start another run
            return
        try:
            state = _train_and_evaluate(r, config, progress=False, skip_busy=True)
        except UserError as e:  # the parent's pass runs it again and reports the error
            say(r, f"failed: {e}")
            return
        except KeyboardInterrupt:  # Ctrl-C reaches every process of the group: stop quietly, the parent reports
            return
        if state == "stopped":
            return
        if state == "done":
            say(r, "done")


def run(
    out: Path, config: Config, seeds: list[int], progress: bool = True, jobs: int = 1, tables_only: bool = False
) -> dict[str, Any]:
    """Train and evaluate every run of the plan, then rebuild the tables. ``jobs`` > 1 trains that many runs at
    once in separate processes, each with its share of the CPU threads (small models train faster as several
    single-threaded processes than as one multi-threaded one). Several invocations of the same command, on one
    machine or several sharing OUT, split the runs the same way: each run directory is locked by its trainer.
    ``tables_only`` trains and evaluates nothing: it rebuilds the tables from the runs finished so far (a study in
    progress can be read while its workers run)."""
    validate(config, seeds)
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    if tables_only:
        return common.finish(out, collect(out, config, seeds), _figures, summary)
    if jobs > 1:
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // jobs)
        ctx = multiprocessing.get_context("spawn")
        workers = [
            ctx.Process(target=_worker, args=(out, config, seeds, threads, os.getpid()), daemon=True)
            for _ in range(jobs)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    # one pass in this process: everything when jobs == 1, otherwise what the workers left (it raises their errors)
    runs = plan(out, config, seeds)
    bar = common.progress(len(runs), f"lm study ({config.budget})", progress)
    for r in runs:
        bar.set_postfix_str(f"{r.corpus}/{r.method} seed {r.seed}")
        if _train_and_evaluate(r, config, progress=False, skip_busy=False) == "stopped":
            break
        bar.update(1)
    bar.close()
    results = collect(out, config, seeds)
    return common.finish(out, results, _figures, summary)


# ------------------------------------------------------------------------------------------------- output


def _fmt_interval(p: dict[str, Any] | None, unit: str = " %", digits: int = 2) -> str:
    if not p:
        return "-"
    if p["low"] is None:
        return f"{p['mean']:+.{digits}f}{unit} (1 seed)"
    return f"{p['mean']:+.{digits}f}{unit} [{p['low']:+.{digits}f}, {p['high']:+.{digits}f}]"


def _direction(p: dict[str, Any], below: str, above: str) -> str:
    """The paired interval's claim in words: ``below`` / ``above`` when it excludes zero on that side, else tie."""
    if p["low"] is None:
        return p["verdict"]
    return below if p["high"] < 0 else above if p["low"] > 0 else "tie"


def _mechanism_lines(methods: dict[str, Any], train_length: int) -> list[str]:
    """Dilution (attention entropy / max weight within and beyond the training length) and passkey retrieval."""
    if not any("dilution" in d or "passkey_gain" in d for d in methods.values()):
        return []
    lengths = next((list(d["passkey_gain"]) for d in methods.values() if "passkey_gain" in d), [])
    lines = [
        f"Dilution and passkey retrieval (attention over positions <= {train_length} vs beyond; passkey gain = "
        "how much more likely the key is after the question when the needle holds it than when it holds "
        "another key, nats per answer token, 5 depths):",
        "",
        "| "
        + " | ".join(
            [
                "method",
                "entropy within / beyond",
                "max weight within / beyond",
                "entropy beyond vs vanilla, paired",
                *(f"passkey gain @{L}" for L in lengths),
                *([f"passkey gain @{lengths[-1]} vs vanilla, paired"] if lengths else []),
            ]
        )
        + " |",
        "|---" * (4 + len(lengths) + bool(lengths)) + "|",
    ]
    for m, d in methods.items():
        dil = d.get("dilution")
        cells = [m] + [
            f"{dil[f'{k}_within']:.3f} / " + (f"{dil[f'{k}_beyond']:.3f}" if f"{k}_beyond" in dil else "-")
            if dil
            else "-"
            for k in ("entropy", "max_weight")
        ]
        pe = d.get("paired_entropy_beyond")
        cells.append(f"{_fmt_interval(pe, ' nats', 3)}: {_direction(pe, 'sharper', 'flatter')}" if pe else "-")
        gains = d.get("passkey_gain", {})
        cells += [f"{gains[L]:+.3f}" if L in gains else "-" for L in lengths]
        if lengths:
            pg = d.get("paired_passkey_gain", {}).get(lengths[-1])
            cells.append(f"{_fmt_interval(pg, '', 3)}: {_direction(pg, 'less', 'more')}" if pg else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _length_basis(results: dict[str, Any], corpus: str) -> str:
    """What the by-length columns were measured on: the documents' length distribution and windows per length."""
    rec = next((r for r in results["runs"] if r["corpus"] == corpus), None)
    if rec is None:
        return ""
    docs = rec["length_documents"]
    wins = rec.get("windows_by_length") or {}
    return (
        f"Perplexity by length: windows inside one document of {results['config']['length_corpus']} val "
        f"({docs['documents']} documents of {docs['min']:,.0f} / {docs['median']:,.0f} / {docs['max']:,.0f} "
        "tokens min / median / max)"
        + ("; windows per length: " + ", ".join(f"{L}: {n}" for L, n in wins.items()) if wins else "")
        + "."
    )


def temperature_lines(methods: dict[str, Any]) -> list[str]:
    rows = [(m, d["temperatures"]) for m, d in methods.items() if d.get("temperatures")]
    if not rows:
        return []
    lines = [
        "",
        "Where the temperatures ended (c over seeds, layers and heads; reach = how far c could move under "
        "the schedule, position_scale x the sum of the temperature learning rates; token spread = std over "
        "tokens of the token term at a position, mean over layers):",
        "",
        "| row | temperature lr | c start | c reach | c at end: mean [min, max] | token spread q / v | moved |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, t in rows:
        c = t["c_end"]
        sp = t["token_spread"]
        lines.append(
            f"| {m} | {t['lr']:.3g} | "
            + ("-" if t["c_start"] is None else f"{t['c_start']:g}")
            + " | "
            + ("-" if t["c_reach"] is None else f"{t['c_reach']:.3g}")
            + " | "
            + (f"{c['mean']:.3f} [{c['min']:.3f}, {c['max']:.3f}]" if c else "-")
            + " | "
            + (f"{sp.get('query', 0):.3f} / {sp.get('value', 0):.3f}" if sp else "-")
            + " | "
            + ("yes" if t["moved"] else "**no: the row's temperatures did not move**")
            + " |"
        )
    return lines


def summary(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"# Language-model study (budget {cfg['budget']}: {cfg['size']}, seq {cfg['seq_len']}, "
        f"{cfg['max_tokens']:,} tokens per run, seeds {results['seeds']})",
        "",
    ]
    if results["pending"]:
        lines += [
            f"**Incomplete**: {len(results['pending'])} run(s) still to train or evaluate "
            f"(rerun the same command): {', '.join(results['pending'])}",
            "",
        ]
    if results.get("choice"):
        ch = results["choice"]
        lines += [
            f"**Choice** ({ch['rule']}; {'final' if results['complete'] else 'provisional: runs pending'}): "
            f"`{ch['method']}`, {_fmt_interval(ch['paired_percent'])} vs vanilla"
            + (f", tied with {', '.join(ch['tied_with'])}" if ch["tied_with"] else ""),
            "",
        ]
    for corpus, c in results["corpora"].items():
        methods = c["methods"]
        lengths = list(next(iter(methods.values()))["ppl_by_length"])
        lines += [
            f"## {corpus} (unigram perplexity floor {c['unigram_ppl']:.1f})",
            "",
            "| method | new params | val ppl | per seed | vs vanilla, paired [95 % CI] | verdict | "
            "speed-up to vanilla's ppl | equal wall-clock vs vanilla | tokens/s | "
            + " | ".join(f"ppl @{L}" for L in lengths)
            + " |",
            "|---" * (9 + len(lengths)) + "|",
        ]
        for m, d in methods.items():
            pp = d.get("paired_percent")
            sp = d.get("speedup")
            cells = [
                m,
                f"{d['new_parameters']:,} ({d['parameter_percent']:.2f} %)",
                f"{d['val_ppl']:.2f} ± {d['val_ppl_std']:.2f}",
                " / ".join(f"{v:.2f}" for v in d["val_ppl_per_seed"]),
                _fmt_interval(pp),
                pp["verdict"] if pp else "-",
                "-"
                if m == "vanilla"
                else (f"not reached ({d['speedup_reached']} seeds)" if sp is None else f"{sp:.2f}x"),
                _fmt_interval(d.get("paired_percent_equal_time")),
                f"{d['tokens_per_s']:,.0f}",
            ]
            cells += [f"{d['ppl_by_length'][L]:.2f}" for L in lengths]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", _length_basis(results, corpus)]
        lines += ["", "Paired change of perplexity vs vanilla by evaluation length (95 % CI):", ""]
        for m, d in methods.items():
            if m != "vanilla" and "paired_percent_by_length" in d:
                lines.append(
                    f"- {m}: "
                    + "; ".join(
                        f"@{L}: {_fmt_interval(p)} ({p['verdict']})" for L, p in d["paired_percent_by_length"].items()
                    )
                )
        lines += temperature_lines(methods)
        late = methods.get("vanilla", {}).get("late_improvement_percent")
        if late is not None:
            lines += [
                "",
                f"Vanilla's validation perplexity fell {late:.1f} % over its last 20 % of tokens (mean over "
                f"seeds; a plateau would be < 2 %{': it has not plateaued' if late >= 2 else ''}).",
            ]
        lines.append("")
        lines += _mechanism_lines(methods, cfg["seq_len"])
    return "\n".join(lines)


def log_binned(position: list[float], values: list[float], bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Means of ``values`` in ``bins`` log-spaced position bins (empty bins dropped), at each bin's geometric
    centre: a per-position curve read on a log axis without its per-position noise."""
    x, y = np.asarray(position, dtype=float), np.asarray(values, dtype=float)
    edges = np.geomspace(x.min(), x.max(), bins + 1)
    # bin b holds edges[b] <= x < edges[b + 1]; the last bin also holds x.max()
    which = np.minimum(np.searchsorted(edges, x, side="right") - 1, bins - 1)
    counts = np.bincount(which, minlength=bins)
    kept = counts > 0
    centres = np.exp(np.bincount(which, np.log(x), minlength=bins)[kept] / counts[kept])
    return centres, np.bincount(which, y, minlength=bins)[kept] / counts[kept]


def _figures(out: Path, results: dict[str, Any]) -> None:
    plt = common.pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for corpus, c in results["corpora"].items():
        records = [r for r in results["runs"] if r["corpus"] == corpus]
        methods = list(c["methods"])
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        ax = axes[0]
        for m in methods:
            for i, r in enumerate(r for r in records if r["method"] == m):
                ax.plot(
                    r["curve"]["tokens"],
                    r["curve"]["ppl"],
                    color=f"C{methods.index(m)}",
                    alpha=0.7,
                    label=m if i == 0 else None,
                )
        ax.axhline(c["unigram_ppl"], color="k", ls=":", lw=1, label="unigram floor")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="training tokens",
            ylabel="validation perplexity",
            title=f"{corpus}: validation curves (every seed)",
        )
        for axis in (ax.xaxis, ax.yaxis):  # 200k, 500k, 1M / 50, 100, 200: labels that fit, not 2 x 10^5
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(short_count))
            axis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
        ax = axes[1]
        for i, m in enumerate(methods):
            d = c["methods"][m]
            xs = [int(L) for L in d["ppl_by_length"]]
            ax.errorbar(
                xs,
                list(d["ppl_by_length"].values()),
                yerr=list(d["ppl_by_length_std"].values()),
                marker="o",
                capsize=3,
                color=f"C{i}",
                label=m,
            )
        ax.set(
            xscale="log",
            xlabel="evaluation length (tokens)",
            ylabel="perplexity",
            title=f"perplexity by length ({results['config']['length_corpus']} val)",
        )
        lengths = sorted({int(L) for m in methods for L in c["methods"][m]["ppl_by_length"]})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=8)
        ax = axes[2]
        for i, m in enumerate(methods):
            curves = [r["attention_by_position"] for r in records if r["method"] == m and r["attention_by_position"]]
            if curves:
                ent = np.mean([cv["entropy"] for cv in curves], axis=0)  # over seeds, per position
                ax.plot(*log_binned(curves[0]["position"], ent), color=f"C{i}", label=m)
        ax.axvline(results["config"]["seq_len"], color="k", ls="--", lw=1, label="training length")
        ax.set(
            xscale="log",
            xlabel="query position",
            ylabel="attention entropy (nats)",
            title="attention entropy by position (log-binned mean)",
        )
        ax.legend(fontsize=8)
        common.save_figure(fig, out / f"lm-{label(corpus)}.png")
        # paired differences with their intervals: the figure a claim rests on
        rows = [(m, c["methods"][m]["paired_percent"]) for m in methods if "paired_percent" in c["methods"][m]]
        if rows:
            fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
            for y, (m, p) in enumerate(rows):
                lo = p["low"] if p["low"] is not None else p["mean"]
                hi = p["high"] if p["high"] is not None else p["mean"]
                ax.errorbar(
                    p["mean"],
                    y,
                    xerr=[[p["mean"] - lo], [hi - p["mean"]]],
                    fmt="o",
                    capsize=3,
                    color=f"C{methods.index(m)}",
                )
            ax.axvline(0, color="k", lw=1)
            ax.set_yticks(range(len(rows)), [m for m, _ in rows])
            ax.invert_yaxis()
            ax.set(
                xlabel="validation perplexity vs vanilla, paired (%), 95 % CI (left of 0: better)",
                title=f"{corpus}: paired differences to vanilla",
            )
            common.save_figure(fig, out / f"lm-{label(corpus)}-paired.png")
