"""The LM study's figures: per corpus the validation curves, perplexity by length and attention entropy by position
(``lm-<corpus>.png``), and the paired differences to vanilla with their intervals (``lm-<corpus>-paired.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from selective_attention.experiments import common
from selective_attention.experiments.lm.runs import label
from selective_attention.utils.stats import short_count


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


def write_figures(out: Path, results: dict[str, Any]) -> None:
    """Every figure of the results, written into ``out``."""
    plt = common.pyplot()
    from matplotlib.ticker import NullFormatter

    for corpus, c in results["corpora"].items():
        records = [r for r in results["runs"] if r["corpus"] == corpus]
        methods = list(c["methods"])
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        plot_validation_curves(axes[0], records, methods, f"{corpus}: validation curves (every seed)", c["unigram_ppl"])
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
            paired_figure(rows, methods, corpus, out / f"lm-{label(corpus)}-paired.png")
        temperatures_figure(records, methods, corpus, out / f"lm-{label(corpus)}-temperatures.png")


def plot_validation_curves(
    ax: Any, records: list[dict[str, Any]], methods: list[str], title: str, floor: float | None = None
) -> None:
    """Every run's validation curve ("curve": tokens, ppl) on log axes, one colour per method."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for m in methods:
        for i, r in enumerate(r for r in records if r["method"] == m):
            ax.plot(
                r["curve"]["tokens"],
                r["curve"]["ppl"],
                color=f"C{methods.index(m)}",
                alpha=0.7,
                label=m if i == 0 else None,
            )
    if floor is not None:
        ax.axhline(floor, color="k", ls=":", lw=1, label="unigram floor")
    ax.set(xscale="log", yscale="log", xlabel="training tokens", ylabel="validation perplexity", title=title)
    for axis in (ax.xaxis, ax.yaxis):  # 200k, 500k, 1M / 50, 100, 200: labels that fit, not 2 x 10^5
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(short_count))
        axis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=8)


def _bounds(p: dict[str, Any]) -> tuple[float, float]:
    return (p["low"] if p["low"] is not None else p["mean"], p["high"] if p["high"] is not None else p["mean"])


def off_scale(rows: list[tuple[str, dict[str, Any]]], factor: float = 10.0, beyond: float = 20.0) -> set[str]:
    """The rows above the first gap of more than ``factor`` x in how far their intervals reach from 0, counted from
    the farthest, and reaching beyond ``beyond`` percent (e.g. a +139 % beside -0.5 % ones): drawn at the edge with
    their numbers, so that the others stay readable. None when there is no such gap."""
    ranked = sorted(((max(abs(v) for v in _bounds(p)), m) for m, p in rows), reverse=True)
    for k in range(len(ranked) - 1):
        if ranked[k][0] <= beyond:
            break
        if ranked[k][0] > factor * max(ranked[k + 1][0], 1e-9):
            return {m for _, m in ranked[: k + 1]}
    return set()


def paired_figure(rows: list[tuple[str, dict[str, Any]]], methods: list[str], corpus: str, path: Path) -> None:
    plt = common.pyplot()
    far = off_scale(rows)
    near = [max(abs(v) for v in _bounds(p)) for m, p in rows if m not in far]
    edge = 1.15 * max(max(near, default=1.0), 1e-3)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    for y, (m, p) in enumerate(rows):
        lo, hi = _bounds(p)
        colour = f"C{methods.index(m)}"
        if m in far:  # an arrow at the edge, its numbers beside it
            side = 1 if p["mean"] > 0 else -1
            ax.plot(side * edge, y, marker=">" if side > 0 else "<", color=colour, ms=9)
            ax.annotate(
                f"{p['mean']:+.1f} % [{lo:+.1f}, {hi:+.1f}] (off the scale)",
                (side * edge, y),
                xytext=(-8 * side, 0),
                textcoords="offset points",
                ha="right" if side > 0 else "left",
                va="center",
                fontsize=8,
                color=colour,
            )
            continue
        ax.errorbar(p["mean"], y, xerr=[[p["mean"] - lo], [hi - p["mean"]]], fmt="o", capsize=3, color=colour)
    if far:
        ax.set_xlim(-1.05 * edge, 1.05 * edge)
    _save_row_chart(
        fig,
        ax,
        [m for m, _ in rows],
        0.0,
        "validation perplexity vs vanilla, paired (%), 95 % CI (left of 0: better)",
        f"{corpus}: paired differences to vanilla",
        path,
    )


def _save_row_chart(fig: Any, ax: Any, rows: list[str], line: float, xlabel: str, title: str, path: Path) -> None:
    """The end of a one-row-per-method chart: the reference line, the rows top-down, labels, saved."""
    ax.axvline(line, color="k", lw=1)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    common.save_figure(fig, path)


def tokens_to_target_figure(methods: dict[str, dict[str, Any]], corpus: str, path: Path) -> None:
    """Each row's tokens-to-target per seed ("speedup_per_seed": vanilla's tokens to its final ppl / the row's),
    a seed that never reached it named beside the row; nothing when no row has one."""
    rows = [(m, d) for m, d in methods.items() if m != "vanilla" and d.get("speedup_per_seed")]
    if not rows:
        return
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.4))
    for y, (m, d) in enumerate(rows):
        vals = [v for v in d["speedup_per_seed"] if v is not None]
        ax.scatter(vals, [y] * len(vals), color=f"C{list(methods).index(m)}")
        missed = len(d["speedup_per_seed"]) - len(vals)
        if missed:
            ax.annotate(f"{missed} seed(s) never reached it", (1.0, y), fontsize=8)
    _save_row_chart(
        fig,
        ax,
        [m for m, _ in rows],
        1.0,
        "vanilla's tokens / the row's tokens to reach vanilla's final ppl (> 1: fewer tokens)",
        f"{corpus}: tokens-to-target per seed",
        path,
    )


def layer_coefficients(temperatures: dict[str, Any]) -> list[list[float]]:
    """c per layer (a list over its heads, one entry for a per-layer c) from a run's "temperatures" record: the
    query temperatures' modules in layer order; [] for a row without a position term."""
    return [m["c"] for m in temperatures["modules"] if m.get("target") == "query" and m.get("c")]


def temperatures_figure(records: list[dict[str, Any]], methods: list[str], corpus: str, path: Path) -> None:
    """Where every row's temperatures ended, per layer: the position coefficient c (the mean over heads and seeds,
    the band from the lowest to the highest head of any seed) and, where some row has a token term, its spread over
    tokens (query and value, mean over seeds) in a second panel. Nothing when no row has either."""
    kept = [r for r in records if (r.get("temperatures") or {}).get("modules")]  # runs with temperature parameters
    rows = [m for m in methods if any(r["method"] == m for r in kept)]
    c_series: dict[str, tuple[list[float], list[float], list[float]]] = {}  # row -> per layer mean, min, max
    spread_series: list[tuple[str, str, np.ndarray]] = []  # (row, line style, per layer mean)
    for m in rows:
        recs = [r["temperatures"] for r in kept if r["method"] == m]
        per_seed = [layer_coefficients(t) for t in recs]
        if per_seed and all(per_seed) and len({len(c) for c in per_seed}) == 1:
            heads = [[v for c in per_seed for v in c[layer]] for layer in range(len(per_seed[0]))]  # every seed's
            c_series[m] = ([float(np.mean(h)) for h in heads], [min(h) for h in heads], [max(h) for h in heads])
        spreads = [t["token_spread"] for t in recs if t.get("token_spread")]
        for target, style in (("query", "-"), ("value", "--")):
            per_layer = [sp[target] for sp in spreads if any(sp.get(target, []))]
            if per_layer:
                spread_series.append((m, style, np.mean(per_layer, axis=0)))
    if not c_series and not spread_series:  # a constant per head has neither
        return
    plt = common.pyplot()
    panels = [p for p, series in (("c", c_series), ("spread", spread_series)) if series]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    ax = dict(zip(panels, axes[0], strict=True))
    for m, (mean, low, high) in c_series.items():
        colour = f"C{methods.index(m)}"
        layers = range(len(mean))
        ax["c"].plot(layers, mean, marker="o", color=colour)
        ax["c"].fill_between(layers, low, high, color=colour, alpha=0.15)
    if c_series:
        ax["c"].axhline(0, color="k", lw=1)
        title = "c (mean over heads and seeds; band: every head)"
        ax["c"].set(xlabel="layer", ylabel="position coefficient c", title=title)
    for m, style, spread in spread_series:
        ax["spread"].plot(range(len(spread)), spread, ls=style, marker="o", color=f"C{methods.index(m)}")
    if spread_series:
        title = "token term's spread (solid: q, dashed: v)"
        ax["spread"].set(xlabel="layer", ylabel="std over tokens of the token term", title=title)
    fig.suptitle(f"{corpus}: where the temperatures ended")
    from matplotlib.ticker import MaxNLocator

    for a in ax.values():
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    drawn = dict.fromkeys([*c_series, *(m for m, _, _ in spread_series)])
    handles = [plt.Line2D([], [], color=f"C{methods.index(m)}", marker="o", label=m) for m in drawn]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    common.save_figure(fig, path)
