"""Measurement helpers shared by the experiments, the probes and the report: mean and sample std over seeds,
attention-row statistics and the Markdown table writer. One implementation of each (the report reads JSON,
the experiments and probes compute): keep it dependency-free here (``row_statistics`` works on tensors it is
given and imports nothing)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


def is_finite(x: Any) -> bool:
    """A real, finite number (None, strings, nan and inf are not)."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over seeds; std 0.0 for one value, (nan, nan) for none."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def row_statistics(w: Tensor) -> dict[str, Tensor]:
    """Per query position, averaged over every leading axis (batch, heads): ``entropy`` (nats) of each attention
    row, ``max_weight``, and ``spikiness`` 1 / (p * sum_j w_j^2) over the p keys a causal row sees (1 for a
    uniform row, 1/p for a one-hot one). w (..., Tq, Tk) -> {name: (Tq,)}; causal rows are bottom-right aligned
    (query i sees Tk - Tq + i + 1 keys). Half precision is measured in float32, other dtypes as given."""
    if w.dtype.is_floating_point and w.element_size() < 4:
        w = w.float()
    Tq, Tk = w.shape[-2], w.shape[-1]
    p = w.new_ones(Tq).cumsum(0) + (Tk - Tq)  # (Tq,) visible keys per query, exact integers
    dims = tuple(range(w.dim() - 2))
    ent = -(w * w.clamp_min(1e-30).log()).sum(-1)  # (..., Tq)
    spk = 1.0 / (p * (w**2).sum(-1))
    stats = {"entropy": ent, "spikiness": spk, "max_weight": w.amax(-1)}
    return {k: v.mean(dims) if dims else v for k, v in stats.items()}  # mean(()) would reduce every axis


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub Markdown table: ``| a | b |`` / ``|---|---|`` / one line per row (cells already formatted)."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"a row has {len(r)} cells, the header {len(header)}")
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 4) -> str:
    """``digits`` significant digits; "nan" for a missing or non-finite-nan value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.{digits}g}"


def short_count(x: float, _pos: object = None) -> str:
    """250k, 4M, 1.5B: token counts on figure axes (a matplotlib FuncFormatter takes (x, pos))."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{suffix}"
    return f"{x:g}"


def methods_table(methods: dict[str, dict[str, float]], metrics: Iterable[str], digits: int = 4) -> str:
    """| method | metric (mean ± std) | ... | from {method: {metric: mean, metric_std: std}}; a metric a method
    did not measure shows as "-"."""
    metrics = list(metrics)
    rows = [
        [method]
        + [f"{fmt(vals[m], digits)} ± {fmt(vals.get(m + '_std', 0.0), 2)}" if m in vals else "-" for m in metrics]
        for method, vals in methods.items()
    ]
    return markdown_table(["method", *metrics], rows)


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom (4.303 for df 2)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def paired(diffs: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of per-seed (paired) differences, its Student-t interval and the claim it allows: "wins" when the
    whole interval is below zero (lower is better), "loses" when above, else "tie"; no interval for one pair."""
    n = len(diffs)
    if n == 0:
        return {"mean": math.nan, "low": None, "high": None, "n": 0, "verdict": "no pairs"}
    if not all(math.isfinite(d) for d in diffs):
        return {"mean": math.nan, "low": None, "high": None, "n": n, "verdict": "non-finite difference"}
    mean, std = mean_std(diffs)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "verdict": "one seed: no interval"}
    half = t_quantile(n - 1, level) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return {"mean": mean, "low": lo, "high": hi, "n": n, "verdict": "wins" if hi < 0 else "loses" if lo > 0 else "tie"}


def ratio_claim(ratio: float | None, paired_change: dict[str, Any] | None) -> str:
    """What a tokens-to-target ratio (baseline's tokens / the method's, to the baseline's final perplexity) may be
    called, given the method's paired change of final perplexity (``paired``): "speed-up" only when the method is
    better (the whole interval below zero) and the ratio is above 1, "slow-down" for the mirror case, else why it
    is neither ("within noise: tie", "one seed: no interval", ...). A tie is never called a speed-up."""
    if ratio is None:
        return "not reached"
    if paired_change is None:
        return "no seed shared with the baseline"
    if paired_change["low"] is None:
        return str(paired_change["verdict"])  # "one seed: no interval", "non-finite difference"
    if paired_change["verdict"] == "wins":
        return "speed-up" if ratio > 1 else "better final ppl, but not faster to the target"
    if paired_change["verdict"] == "loses":
        return "slow-down" if ratio < 1 else "worse final ppl, although faster to the target"
    return "within noise: tie"


def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float, log_y: bool = False) -> float | None:
    """The first x at which the curve ys(xs) comes down to ``target`` (ys <= target), interpolated between the two
    points around the crossing, linearly in y or in log y; the first x when the curve starts there; None if never.
    (Tokens-to-target of a validation curve.)"""
    f = math.log if log_y else float
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0 or ys[i - 1] == y:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (f(y0) - f(target)) / (f(y0) - f(y)) * (x - x0))
    return None
