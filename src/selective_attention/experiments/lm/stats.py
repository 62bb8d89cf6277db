"""The LM study's statistics over finished runs' records: per-row means over seeds, paired differences to vanilla
with 95 % Student-t intervals, tokens-to-target and equal wall-clock from the validation curves, dilution, where
the temperatures ended, the unigram floor and the search's pre-registered choice rule."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from selective_attention.experiments import common
from selective_attention.experiments.lm.config import SEARCH_CONTRASTS, TIE_MARGIN
from selective_attention.utils.stats import first_crossing, paired


def unigram_floor(data: Any, eval_tokens: int) -> float:
    """The add-one unigram perplexity of a tokenised corpus's train split on its first ``eval_tokens`` validation
    targets (the validation a run scores)."""
    train, val = np.asarray(data.tokens("train")), np.asarray(data.tokens("val"))[: eval_tokens + 1]
    counts = np.bincount(train, minlength=len(data.tokenizer)).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[val[1:]].mean()))


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


def temperature_row(runs: list[dict[str, Any]], train_length: int | None = None) -> dict[str, Any] | None:
    """Where a row's temperatures ended over its seeds: the temperature lr and its bound on c's movement, c at the
    start and at the end (mean, min, max over seeds, layers and heads), the token term's spread, whether they moved
    (None for rows without temperature parameters, or runs from before the record existed). With ``train_length``
    T also how many of those c have 1 + c log T < 0: heads whose position term alone turns the query's sign
    before the window ends (their rows flatten to uniform at p = exp(1 / |c|), then invert)."""
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
        "c_sign_flipped": (
            {"heads": sum(1 + c * math.log(train_length) < 0 for c in cs), "of": len(cs), "length": train_length}
            if cs and train_length
            else None
        ),
    }


def aggregate(records: list[dict[str, Any]], corpus: str, train_length: int | None = None) -> dict[str, dict[str, Any]]:
    """{method: {...}} for one corpus, from the finished runs' records (``train_length``: see temperature_row)."""
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
        d["temperatures"] = temperature_row(runs, train_length)
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
            d.update(_paired_to_vanilla(pairs, lengths))
        methods[method] = d
    return methods


def _paired_to_vanilla(pairs: list[tuple[dict[str, Any], dict[str, Any]]], lengths: list[str]) -> dict[str, Any]:
    """A row's paired comparisons with vanilla's run of the same seed, from (row, vanilla) record pairs."""
    d: dict[str, Any] = {}
    if all("entropy_beyond" in (r["dilution"] or {}) and "entropy_beyond" in (v["dilution"] or {}) for r, v in pairs):
        d["paired_entropy_beyond"] = paired(
            [r["dilution"]["entropy_beyond"] - v["dilution"]["entropy_beyond"] for r, v in pairs]
        )
    if all(r["passkey_gain"] and v["passkey_gain"] for r, v in pairs):
        d["paired_passkey_gain"] = {
            L: paired([r["passkey_gain"][L] - v["passkey_gain"][L] for r, v in pairs])
            for L in pairs[0][0]["passkey_gain"]
        }
    d["paired_percent"] = paired([100 * (r["val_ppl"] - v["val_ppl"]) / v["val_ppl"] for r, v in pairs])
    d["paired_percent_along"] = gap_along_training([(r["curve"], v["curve"]) for r, v in pairs])
    d["paired_percent_by_length"] = {
        L: paired([100 * (r["ppl_by_length"][L] - v["ppl_by_length"][L]) / v["ppl_by_length"][L] for r, v in pairs])
        for L in lengths
    }
    d.update(tokens_to_target([(r["curve"], v["curve"], v["val_ppl"], v["tokens"]) for r, v in pairs]))
    equal_time = []
    for r, v in pairs:
        at = v["train_time_s"] * r["tokens_per_s"]  # the method's tokens after vanilla's training time
        equal_time.append(
            100 * (ppl_at_tokens(r["curve"]["tokens"], r["curve"]["ppl"], at) - v["val_ppl"]) / v["val_ppl"]
        )
    d["paired_percent_equal_time"] = paired(equal_time)
    return d


Curve = dict[str, list[float]]  # {"tokens": [...], "ppl": [...]}: the validations of one run
ALONG = (0.1, 0.25, 0.5, 0.75)  # fractions of the training tokens at which the curves are compared


def gap_along_training(pairs: list[tuple[Curve, Curve]]) -> dict[str, Any]:
    """The paired difference of validation perplexity to vanilla part-way through training, from (row curve,
    vanilla curve) pairs: {fraction: paired(%)} at each of ``ALONG`` x vanilla's last validated token count (both
    curves log-linearly interpolated there); the end of training is the row's main paired difference."""
    out = {}
    for f in ALONG:
        diffs = []
        for row, vanilla in pairs:
            at = f * vanilla["tokens"][-1]
            ref = ppl_at_tokens(vanilla["tokens"], vanilla["ppl"], at)
            diffs.append(100 * (ppl_at_tokens(row["tokens"], row["ppl"], at) - ref) / ref)
        out[f"{f:g}"] = paired(diffs)
    return out


def tokens_to_target(pairs: list[tuple[Curve, Curve, float, float]]) -> dict[str, Any]:
    """Tokens-to-target per seed from (row curve, vanilla curve, vanilla's final ppl, vanilla's tokens): vanilla's
    tokens to its final ppl / the row's (> 1: the row needs fewer; None: the row never reached it), their mean when
    every seed reached it, and how many did."""
    speedups: list[float | None] = []
    for row, vanilla, target, vanilla_tokens in pairs:
        # both sides measured the same way: the first time each curve reaches vanilla's final ppl
        reach = tokens_to_reach(row["tokens"], row["ppl"], target)
        own = tokens_to_reach(vanilla["tokens"], vanilla["ppl"], target) or vanilla_tokens
        speedups.append(None if reach is None else own / reach)
    reached = [s for s in speedups if s is not None]
    return {
        "speedup": common.mean_std(reached)[0] if len(reached) == len(speedups) else None,
        "speedup_reached": f"{len(reached)}/{len(speedups)}",
        "speedup_per_seed": speedups,
    }


def choose(methods: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The search's pre-registered choice rule (see config.SEARCH) over aggregated rows with a paired difference."""
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


def val_ppl_by_seed(records: list[dict[str, Any]], corpus: str) -> dict[str, dict[int, float]]:
    """{method: {seed: val_ppl}} of the records on ``corpus``."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        if r["corpus"] == corpus:
            out.setdefault(r["method"], {})[r["seed"]] = r["val_ppl"]
    return out


def contrasts(
    records: list[dict[str, Any]], corpus: str, pairs: tuple[tuple[str, str, str], ...] = SEARCH_CONTRASTS
) -> list[dict[str, Any]]:
    """What one part does: for each (row with it, row without it, the part) of ``pairs`` whose two rows share a
    seed on ``corpus``, the change of val ppl from the row without to the row with (%, paired by seed; the two
    start from the same weights and data order)."""
    ppl = val_ppl_by_seed(records, corpus)
    out = []
    for with_, without, part in pairs:
        seeds = sorted(set(ppl.get(with_, {})) & set(ppl.get(without, {})))
        if seeds:
            diffs = [100 * (ppl[with_][k] - ppl[without][k]) / ppl[without][k] for k in seeds]
            out.append({"part": part, "with": with_, "without": without, "seeds": seeds, "percent": paired(diffs)})
    return out


def confirmation(records: list[dict[str, Any]], chosen: str, corpora: tuple[str, ...]) -> dict[str, Any]:
    """The confirmation's reading (see config.CONFIRM_ROWS): per non-vanilla row the paired difference to vanilla
    (% of vanilla's val ppl, same corpus and seed) pooled over every corpus's pairs and per corpus, and the verdict
    on ``chosen``: "confirmed" (pooled interval below zero and a negative mean on every corpus), "loses" (pooled
    interval above zero), "tie" (otherwise), or "incomplete" while one of ``corpora`` has no pair."""
    ppl = {c: val_ppl_by_seed(records, c) for c in corpora}
    rows: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in records if r["method"] != "vanilla"):
        diffs: dict[str, list[float]] = {}
        for c, by_method in ppl.items():
            own, vanilla = by_method.get(method, {}), by_method.get("vanilla", {})
            if seeds := sorted(set(own) & set(vanilla)):
                diffs[c] = [100 * (own[k] - vanilla[k]) / vanilla[k] for k in seeds]
        rows[method] = {
            "pooled_percent": paired([d for c in corpora for d in diffs.get(c, [])]),
            "per_corpus_percent": {c: paired(d) for c, d in diffs.items()},
        }
    row = rows.get(chosen)
    pooled = row["pooled_percent"] if row else None
    if row is None or pooled is None or len(row["per_corpus_percent"]) < len(corpora) or pooled["low"] is None:
        verdict = "incomplete"
    elif pooled["high"] < 0 and all(p["mean"] < 0 for p in row["per_corpus_percent"].values()):
        verdict = "confirmed"
    else:
        verdict = "loses" if pooled["low"] > 0 else "tie"
    return {"chosen": chosen, "verdict": verdict, "rows": rows}


def across_packings(packed: list[dict[str, Any]], stitched: list[dict[str, Any]], corpus: str) -> dict[str, Any]:
    """Packed runs against the stitched runs of the same row and seed on ``corpus`` (records with method, seed,
    val_ppl; each validated in its own packing): per row the change of val ppl, packed vs stitched (%, paired by
    seed), and per non-vanilla row the change of its paired difference to vanilla (percentage points, paired by
    seed) - what the two validations share cancels in the latter, so it says whether the row gains more from
    documents apart than vanilla does."""
    p, s = val_ppl_by_seed(packed, corpus), val_ppl_by_seed(stitched, corpus)
    rows: dict[str, Any] = {}
    for m in (m for m in p if m in s):
        seeds = sorted(set(p[m]) & set(s[m]))
        row: dict[str, Any] = {
            "seeds": seeds,
            "packed_vs_stitched_percent": paired([100 * (p[m][k] - s[m][k]) / s[m][k] for k in seeds]),
        }
        if m != "vanilla" and "vanilla" in p and "vanilla" in s:
            both = [k for k in seeds if k in p["vanilla"] and k in s["vanilla"]]
            row["vs_vanilla_change_pp"] = paired(
                [
                    100 * (p[m][k] / p["vanilla"][k] - s[m][k] / s["vanilla"][k])  # packed gap - stitched gap
                    for k in both
                ]
            )
        rows[m] = row
    return rows
