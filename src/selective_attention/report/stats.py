"""Per-method summaries of the runs: mean +- std over seeds, tokens-to-target, and the paired comparison that decides
whether a tokens-to-target ratio may be called a speed-up.

Tokens-to-target: the tokens the baseline needs to reach its own final validation perplexity, divided by the tokens
another method needs to reach that same perplexity (first crossing, linearly interpolated between evaluations on
the mean curve over seeds); None ("not reached") when it never gets there. The ratio is measured on one mean curve
per method, so on its own it says nothing about noise: the paired comparison of final validation perplexity (per
seed, method vs baseline, Student-t 95 % interval; ``utils.stats.paired``) says whether the method is better.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from selective_attention.errors import UserError
from selective_attention.report.load import RunRecord
from selective_attention.utils import stats
from selective_attention.utils.stats import first_crossing, is_finite, mean_std, paired


def mean_curve(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds on the tokens every seed covers (interpolated where evaluation points differ)."""
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return np.zeros(0), np.zeros(0)
    lo = max(c[0][0] for c in curves)
    hi = min(c[0][-1] for c in curves)
    grid = np.unique(np.concatenate([c[0] for c in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if len(grid) == 0:
        return curves[0]
    return grid, np.mean([np.interp(grid, t, p) for t, p in curves], axis=0)


def _mean_std(xs: list[Any]) -> tuple[float | None, float | None]:
    """Mean and sample std of the finite values; (None, None) when there is none."""
    xs = [x for x in xs if is_finite(x)]
    return mean_std(xs) if xs else (None, None)


def final_values(runs: list[RunRecord], key: str) -> list[Any]:
    """Each run's ``key`` from run.json (e.g. "final_val_ppl"); a missing final validation value falls back on the
    last validation line of metrics.jsonl."""
    vals = [r.info.get(key) for r in runs]
    if key.startswith("final_val"):
        vals = [v if is_finite(v) else r.last_metric(key[len("final_") :]) for v, r in zip(vals, runs)]
    return vals


def _crossing(t: np.ndarray, p: np.ndarray, target: float) -> float | None:
    return first_crossing(t.tolist(), p.tolist(), target)  # tolist: the same float64 values as plain floats


def paired_val_ppl(runs: list[RunRecord], baseline_runs: list[RunRecord]) -> dict[str, Any] | None:
    """The paired change of final validation perplexity vs the baseline in % (runs of the same seed), with its
    95 % interval and verdict (``utils.stats.paired``); None when no seed is shared."""
    base_values = final_values(baseline_runs, "final_val_ppl")
    base = {r.seed: v for r, v in zip(baseline_runs, base_values) if r.seed is not None}
    diffs = [
        100.0 * (float(v) - float(base[r.seed])) / float(base[r.seed])
        for r, v in zip(runs, final_values(runs, "final_val_ppl"))
        if r.seed is not None and r.seed in base and is_finite(v) and is_finite(base[r.seed])
    ]
    return paired(diffs) if diffs else None


def summarise(groups: dict[str, list[RunRecord]], baseline: str | None = None) -> dict[str, Any]:
    """Per-method mean +- std and the tokens-to-target ratio against ``baseline`` (default: "vanilla" when
    present, else the first method), with each other method's paired comparison against it."""
    if not groups:
        raise UserError("no runs to report")
    baseline = baseline or ("vanilla" if "vanilla" in groups else next(iter(groups)))
    if baseline not in groups:
        raise UserError(f"baseline {baseline!r} is not among the methods {sorted(groups)}")
    curves = {m: mean_curve([r.val_curve() for r in rs]) for m, rs in groups.items()}
    methods: dict[str, Any] = {}
    for m, rs in groups.items():
        d: dict[str, Any] = {"runs": len(rs), "seeds": [r.seed for r in rs], "dirs": [str(r.path) for r in rs]}
        for key in ("final_val_ppl", "final_val_loss", "tokens_per_s", "tokens"):
            d[key], d[key + "_std"] = _mean_std(final_values(rs, key))
        params = next((r.info["parameters"] for r in rs if isinstance(r.info.get("parameters"), dict)), None)
        d["parameters"] = params
        methods[m] = d
    bt, bp = curves[baseline]
    target = float(bp[-1]) if len(bp) else methods[baseline]["final_val_ppl"]
    base_tokens = _crossing(bt, bp, target) if target is not None and len(bt) else None
    for m, d in methods.items():
        t, p = curves[m]
        reach = _crossing(t, p, target) if target is not None and len(t) else None
        d["tokens_to_target"] = reach
        d["speedup"] = (base_tokens / reach) if (reach and base_tokens) else None
        d["reached_target"] = reach is not None
        d["paired_val_ppl_percent"] = None if m == baseline else paired_val_ppl(groups[m], groups[baseline])
    return {
        "baseline": baseline,
        "target_val_ppl": target,
        "baseline_tokens_to_target": base_tokens,
        "methods": methods,
    }


def ratio_claim(d: dict[str, Any]) -> str:
    """What a method's tokens-to-target ratio may be called (``utils.stats.ratio_claim``: a tie is never a
    speed-up)."""
    return stats.ratio_claim(d.get("speedup"), d.get("paired_val_ppl_percent"))
