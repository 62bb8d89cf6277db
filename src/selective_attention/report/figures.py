"""The report's matplotlib figures (PNG, written atomically): training curves, attention dilution, parameter
overhead and the position term of the temperatures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from selective_attention.report.load import RunRecord  # noqa: E402
from selective_attention.report.stats import mean_curve  # noqa: E402
from selective_attention.utils import stats  # noqa: E402
from selective_attention.utils.io import atomic_write  # noqa: E402

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def plot_curves(groups: dict[str, list[RunRecord]], path: Path, target: float | None = None) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    ax_v, ax_t = axes
    for i, (m, rs) in enumerate(groups.items()):
        c = color(i)
        for r in rs:
            t, p = r.val_curve()
            if len(t) and len(rs) > 1:
                ax_v.plot(t, p, color=c, alpha=0.25, lw=1)
        t, p = mean_curve([r.val_curve() for r in rs])
        if len(t):
            ax_v.plot(t, p, color=c, lw=2, marker="o", ms=3, label=f"{m} (n={len(rs)})")
        tt, tl = mean_curve([r.train_curve() for r in rs])
        if len(tt):
            k = max(1, len(tl) // 50)  # moving average for a readable training curve
            sm = np.convolve(tl, np.ones(k) / k, mode="valid")
            ax_t.plot(tt[k - 1 :], sm, color=c, lw=1.5, label=m)
    if target is not None:
        ax_v.axhline(target, color="grey", ls="--", lw=1, label=f"baseline final ({target:.2f})")
    ax_v.set(xlabel="training tokens", ylabel="validation perplexity", title="Validation perplexity")
    ax_v.set_yscale("log")
    ax_t.set(xlabel="training tokens", ylabel="training loss", title="Training loss (smoothed)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # e.g. no training-loss lines: no empty legend (and no warning)
            ax.legend(fontsize=8)
        ax.xaxis.set_major_formatter(FuncFormatter(stats.short_count))  # 250k, not 250000: the labels overlapped
    fig.tight_layout()
    return _save(fig, path)


def plot_dilution(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (m, c) in enumerate(curves.items()):
        axes[0].plot(c["position"], c["entropy"], color=color(i), lw=1.5, label=m)
        axes[1].plot(c["position"], c["max_weight"], color=color(i), lw=1.5, label=m)
    if curves:
        c0 = next(iter(curves.values()))
        axes[0].plot(c0["position"], c0["uniform_entropy"], color="grey", ls="--", lw=1, label="uniform row (log p)")
    axes[0].set(
        xlabel="query position p", ylabel="attention entropy (nats)", title="Row entropy vs position (lower = sparser)"
    )
    axes[1].set(xlabel="query position p", ylabel="max attention weight", title="Max weight vs position")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # e.g. no training-loss lines: no empty legend (and no warning)
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_parameters(methods: dict[str, Any], path: Path) -> Path | None:
    rows = [(m, d["parameters"]) for m, d in methods.items() if d.get("parameters")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(rows)), dpi=110)
    names = [m for m, _ in rows]
    pct = [float(p.get("percent", 0.0)) for _, p in rows]
    ax.barh(names, pct, color=[color(i) for i in range(len(rows))])
    for i, v in enumerate(pct):
        ax.text(v, i, f" {v:.3f} %", va="center", fontsize=8)
    ax.set(xlabel="new parameters (% of the base model)", title="Parameter overhead")
    ax.set_xlim(0, max(pct + [0.1]) * 1.35)
    fig.tight_layout()
    return _save(fig, path)


def plot_position_terms(terms: dict[str, list[float]], path: Path) -> Path:
    """The position term 1 + c log p of each method's query temperature over the sample text's positions (mean
    over layers and heads): one curve per method, the same for any text."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2), dpi=110)
    for i, (m, term) in enumerate(terms.items()):
        ax.plot(range(1, len(term) + 1), term, color=color(i), lw=1.8, label=m)
    ax.axhline(1.0, color="grey", ls="--", lw=1, label="1 (no position term)")
    ax.set(
        xlabel="token position p in the sample text",
        ylabel="1 + c log p",
        title="Position term of the query temperature (mean over layers and heads)",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
