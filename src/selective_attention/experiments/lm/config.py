"""The LM study's settings: ``Config``, its named budgets, the pre-registered configuration search (``SEARCH``) and
the TrainConfig fields of every row it can train. Changing a value here changes which saved runs are reused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError

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


def _search_contrasts() -> tuple[tuple[str, str, str], ...]:
    """(row with the part, row without it, the part) for the search's rows that differ in one part: what each term,
    start and rate does, paired by seed. Descriptive (added after 22 of the 48 runs had finished), not part of the
    choice rule."""
    out: list[tuple[str, str, str]] = []
    for f in SEARCH_LR_FACTORS:
        out += [
            (f"ssa-pos-c0-t{f}", "vanilla", f"the position term alone (query, identity start), {f}x"),
            (f"ssa-tok-t{f}", "vanilla", f"the token terms alone (query + value), {f}x"),
            (f"ssa-q-c0-t{f}", f"ssa-pos-c0-t{f}", f"+ the query's token term, to position-only, {f}x"),
            (f"ssa-c0-t{f}", f"ssa-q-c0-t{f}", f"+ the value temperature, to query-only, {f}x"),
            (f"ssa-c0-t{f}", f"ssa-tok-t{f}", f"+ the position term, to token-only, {f}x"),
        ]
        out += [(f"ssa-c{c:g}-t{f}", f"ssa-c0-t{f}", f"start c = {c:g} instead of 0, {f}x") for c in SEARCH_STARTS[1:]]
    forms = [f"ssa-c{c:g}" for c in SEARCH_STARTS] + ["ssa-pos-c0", "ssa-tok", "ssa-q-c0"]
    lo, hi = SEARCH_LR_FACTORS
    out += [(f"{form}-t{hi}", f"{form}-t{lo}", f"temperature lr {hi}x instead of {lo}x, {form}") for form in forms]
    return tuple(out)


SEARCH_CONTRASTS = _search_contrasts()
CHOSEN = "chosen"  # stands for Config.chosen in a budget's rows
CONFIRM_ROWS = ("vanilla", CHOSEN, "ssmax", "llama4")
# How the confirmation is read (written down before any of its runs): each row's paired difference of val ppl to
# vanilla, in percent of vanilla's run of the same corpus and seed, pooled over the six pairs (wiki seeds 3-5, sotu
# seeds 0-2), with its 95 % Student-t interval. The choice is **confirmed** when that interval lies below zero and
# its mean difference is below zero on each corpus; it **loses** when the interval lies above zero; otherwise it is
# a **tie** (not confirmed). The per-corpus intervals are reported beside it.
# Packed documents (``--budget packed --set chosen=LABEL``; written down before any of its runs): the search's
# budget and seeds on wiki, every window trained and validated with attention and positions restarting at each
# document (TrainConfig.packing "documents"), the confirmation's rows. Within the budget: each row vs vanilla,
# paired by seed, as everywhere. Across packings: vanilla and the chosen row pair seed by seed with the search's
# stitched runs (same data order, model and budget), each validated in its own packing (``--set
# stitched_from=OUT`` names that study): a row's packed / stitched change per seed and, the clean measure, how its
# paired difference to vanilla changes (percentage points, paired by seed: what both validations share cancels).
# ``confirm-packed``: the confirmation's wiki rows and seeds (full budget, seeds 3-5) packed, paired in the same
# way with the confirmation's stitched wiki runs.
PACKED_ROWS = CONFIRM_ROWS
# the settings two studies must share for their runs of one seed to pair across packings
PAIRING_FIELDS = ("size", "vocab_size", "seq_len", "batch_size", "lr", "max_tokens", "split_seed")
PRIMARY = ("vanilla", "ssa")  # the headline comparison, trained first
# ``ssa demo``'s SSA row: the configuration search's choice, ``ssa-official-t10`` (no configuration beat vanilla;
# this one cost least): the official form, whose temperatures TrainConfig trains at 10x the base rate from scratch.
# tests/test_lm_study.py checks that it trains exactly the committed search's choice.
DEMO_SSA = "ssa-official"


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
    packing: str = "stitched"  # TrainConfig.packing of every run ("documents": attention restarts per document)
    stitched_from: str = ""  # packed budgets: OUT of the stitched study whose runs pair seed by seed with these


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
    # packed documents (see PACKED_ROWS): the search's settings, documents apart
    "packed": {
        "corpora": ("wiki",),
        "methods": PACKED_ROWS,
        "packing": "documents",
        "passkey_trials": 0,
        "length_windows": 8,
        "entropy_windows": 1,
    },
    # the confirmation's wiki rows and seeds, documents apart (pairs with the confirmation: --set stitched_from=)
    "confirm-packed": {
        "max_tokens": 4_000_000,
        "eval_every": 50,
        "length_windows": 32,
        "corpora": ("wiki",),
        "methods": CONFIRM_ROWS,
        "seed_offsets": (3,),
        "packing": "documents",
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
        "methods": ("vanilla", DEMO_SSA),
        "other_methods": ("vanilla", DEMO_SSA),
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
        "methods": ("vanilla", DEMO_SSA),
        "other_methods": ("vanilla", DEMO_SSA),
    },
}
BUDGET_SEEDS = {
    "quick": 2,
    "default": 3,
    "full": 3,
    "demo": 2,
    "demo-quick": 1,
    "search": 3,
    "confirm": 3,
    "packed": 3,
    "confirm-packed": 3,
}


def corpus_rows(config: Config, corpus_index: int) -> tuple[str, ...]:
    """The rows trained on the corpus at ``corpus_index`` (``chosen`` filled in)."""
    names = config.methods if corpus_index == 0 else config.other_methods
    return tuple(config.chosen if m == CHOSEN else m for m in names)


def corpus_offset(config: Config, corpus_index: int) -> int:
    return config.seed_offsets[corpus_index] if corpus_index < len(config.seed_offsets) else 0


def method_settings(method: str, lr: float = 2e-3) -> dict[str, Any]:
    """TrainConfig fields of one study row: a method name, or a search label ``<form>[-c<start>]-t<factor>``
    (temperature lr = factor x ``lr``). ``ssa`` / ``ssa-mlp`` start at c = 0.5 (scratch)."""
    from selective_attention.config import SSAConfig

    ssa = {"ssa": SSAConfig(init="scratch"), "ssa-mlp": SSAConfig(sharing="mlp", init="scratch")}
    if method in ssa:
        return {"attention": "ssa", "ssa": ssa[method]}
    if method in SEARCH:
        return _search_settings(method, lr)
    from selective_attention.methods import ALIASES
    from selective_attention.methods import METHODS as REGISTRY

    if method in METHODS:  # the full budget's row "ssa-pos" trains under the registry's current name
        return {"attention": ALIASES.get(method, method)}
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
    fields: dict[str, Any] = {  # the terms each form switches off
        "ssa": {},
        "ssa-pos": {"token_aware": False, "value": False},
        "ssa-tok": {"position_aware": False},
        "ssa-q": {"value": False},
    }[kind]
    return {"attention": "ssa", "ssa": SSAConfig(init="identity", position_init=c, **fields), **t_lr}


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
    if config.packing not in ("stitched", "documents"):
        raise UserError(f"packing must be stitched or documents, got {config.packing!r}")
    if config.stitched_from and config.packing != "documents":
        raise UserError("stitched_from pairs a packed study with a stitched one: it needs --set packing=documents")
    if config.stitched_from and not (Path(config.stitched_from) / "results.json").is_file():  # before any training
        raise UserError(f"stitched_from: no results.json in {config.stitched_from} (run or rebuild that study first)")
    if "vanilla" not in config.methods:
        raise UserError("the study compares every method with vanilla: keep vanilla in methods")
    if not config.length_multipliers or min(config.length_multipliers) < 1:
        raise UserError("length_multipliers must be positive integers")
    if config.passkey_trials < 0:
        raise UserError("passkey_trials must be >= 0 (0 = no passkey test)")
