"""The report of a set of training runs: HTML (relative PNG paths), Markdown and JSON.

Input: run directories in the trainer's layout (``metrics.jsonl``, ``run.json``), optionally with the
``probe.json`` that ``selective_attention.evaluate.probe.probe_run`` writes from the run's ``final/`` model.
This package only reads JSON: it never loads a model or a corpus.
Runs are grouped into methods (vanilla, ssa, ssa-mlp, ... or explicit labels), seeds are averaged.

- validation perplexity vs tokens, per method (mean over seeds, each seed faint);
- tokens-to-target speed-up: the tokens the baseline needs to reach its own final validation perplexity,
  divided by the tokens another method needs to reach that same perplexity (first crossing, linearly
  interpolated between evaluations on the mean curve); "not reached" when it never gets there;
- a mean +- std table over seeds; parameter overhead;
- from ``probe.json``, when present: a Figure-1-style per-token temperature picture and the dilution plot
  (attention entropy and max weight vs query position).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from selective_attention.errors import UserError  # noqa: E402
from selective_attention.utils import stats  # noqa: E402
from selective_attention.utils.io import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from selective_attention.utils.stats import first_crossing, is_finite, mean_std  # noqa: E402

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


@dataclass
class Run:
    path: Path
    info: dict[str, Any]
    metrics: list[dict[str, Any]]
    label: str = ""

    @property
    def seed(self) -> Any:
        return self.info.get("seed", self.info.get("config", {}).get("seed"))

    def val_curve(self) -> tuple[np.ndarray, np.ndarray]:
        pts = sorted(
            (float(m["tokens"]), float(m["val_ppl"]))
            for m in self.metrics
            if "val_ppl" in m and m.get("tokens") is not None and is_finite(m["val_ppl"])
        )
        if not pts:
            return np.zeros(0), np.zeros(0)
        t, p = zip(*pts)
        return np.asarray(t), np.asarray(p)

    def train_curve(self) -> tuple[np.ndarray, np.ndarray]:
        pts = [
            (float(m["tokens"]), float(m["train_loss"]))
            for m in self.metrics
            if "train_loss" in m and m.get("tokens") is not None and is_finite(m["train_loss"])
        ]
        if not pts:
            return np.zeros(0), np.zeros(0)
        t, p = zip(*sorted(pts))
        return np.asarray(t), np.asarray(p)


def method_label(info: dict[str, Any]) -> str:
    """vanilla | ssa (shared weights, the default) | ssa-mlp | an explicit ``label`` in run.json."""
    if info.get("label"):
        return str(info["label"])
    att = info.get("attention", info.get("config", {}).get("attention", "?"))
    if att != "ssa":
        return str(att)
    sharing = info.get("config", {}).get("sharing") or info.get("config", {}).get("ssa", {}).get("sharing")
    return "ssa" if sharing in (None, "shared") else f"ssa-{sharing}"


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
    path = Path(path)
    run_json, metrics_path = path / "run.json", path / "metrics.jsonl"
    if not path.is_dir():
        raise UserError(f"not a run directory: {path}")
    if not run_json.is_file() and not metrics_path.is_file():
        raise UserError(f"{path} has neither run.json nor metrics.jsonl (is it a training run directory?)")
    info: dict[str, Any] = {}
    if run_json.is_file():
        try:
            info = json.loads(run_json.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{run_json}: invalid JSON ({e.msg})") from None
    metrics: list[dict[str, Any]] = []
    if metrics_path.is_file():
        lines = metrics_path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:  # only a half-written last line (a run in progress) is tolerated
                    raise UserError(f"{metrics_path}: line {i + 1} is not JSON") from None
    run = Run(path=path, info=info, metrics=metrics)
    run.label = label or method_label(info)
    return run


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    return groups


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


def summarise(groups: dict[str, list[Run]], baseline: str | None = None) -> dict[str, Any]:
    """Per-method mean +- std and the tokens-to-target speed-up against ``baseline`` (default: "vanilla"
    when present, else the first method)."""
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
            vals = [r.info.get(key) for r in rs]
            if key.startswith("final_val"):  # fall back on the last validation line of metrics.jsonl
                vals = [v if is_finite(v) else _last_metric(r, key[len("final_") :]) for v, r in zip(vals, rs)]
            d[key], d[key + "_std"] = _mean_std(vals)
        params = next((r.info["parameters"] for r in rs if isinstance(r.info.get("parameters"), dict)), None)
        d["parameters"] = params
        methods[m] = d
    bt, bp = curves[baseline]
    target = float(bp[-1]) if len(bp) else methods[baseline]["final_val_ppl"]
    base_tokens = first_crossing(bt, bp, target) if target is not None and len(bt) else None
    for m, d in methods.items():
        t, p = curves[m]
        reach = first_crossing(t, p, target) if target is not None and len(t) else None
        d["tokens_to_target"] = reach
        d["speedup"] = (base_tokens / reach) if (reach and base_tokens) else None
        d["reached_target"] = reach is not None
    return {
        "baseline": baseline,
        "target_val_ppl": target,
        "baseline_tokens_to_target": base_tokens,
        "methods": methods,
    }


def _last_metric(run: Run, key: str) -> float | None:
    for m in reversed(run.metrics):
        if key in m and is_finite(m[key]):
            return float(m[key])
    return None


# ----------------------------------------------------------------------------------------------- figures


def plot_curves(groups: dict[str, list[Run]], path: Path, target: float | None = None) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    ax_v, ax_t = axes
    for i, (m, rs) in enumerate(groups.items()):
        c = COLORS[i % len(COLORS)]
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
        ax.legend(fontsize=8)
        ax.xaxis.set_major_formatter(FuncFormatter(stats.short_count))  # 250k, not 250000: the labels overlapped
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def plot_dilution(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for i, (m, c) in enumerate(curves.items()):
        col = COLORS[i % len(COLORS)]
        axes[0].plot(c["position"], c["entropy"], color=col, lw=1.5, label=m)
        axes[1].plot(c["position"], c["max_weight"], color=col, lw=1.5, label=m)
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
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def plot_parameters(methods: dict[str, Any], path: Path) -> Path | None:
    rows = [(m, d["parameters"]) for m, d in methods.items() if d.get("parameters")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(rows)), dpi=110)
    names = [m for m, _ in rows]
    pct = [float(p.get("percent", 0.0)) for _, p in rows]
    ax.barh(names, pct, color=[COLORS[i % len(COLORS)] for i in range(len(rows))])
    for i, v in enumerate(pct):
        ax.text(v, i, f" {v:.3f} %", va="center", fontsize=8)
    ax.set(xlabel="new parameters (% of the base model)", title="Parameter overhead")
    ax.set_xlim(0, max(pct + [0.1]) * 1.35)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- probes

PROBE_FILE = "probe.json"  # written by selective_attention.evaluate.probe.probe_run


@dataclass
class Probes:
    dilution: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    temperatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_probe(run: Run) -> dict[str, Any] | None:
    path = run.path / PROBE_FILE
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg}); delete it and run `ssa report` to probe again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def collect_probes(groups: dict[str, list[Run]]) -> Probes:
    """Each method's first ``probe.json``: dilution curves and the query temperatures (mean over layers) of
    the sample text. Runs without one become notes (``ssa report`` probes them first)."""
    out = Probes()
    for m, rs in groups.items():
        found = next(((r, p) for r in rs if (p := read_probe(r)) is not None), None)
        if found is None:
            if any((r.path / "final").is_dir() for r in rs):
                out.notes.append(
                    f"{m}: its final/ model has not been probed (no {PROBE_FILE}; `ssa report` "
                    "probes it), so no dilution or temperature figure."
                )
            else:
                out.notes.append(f"{m}: no final/ model directory, so no dilution or temperature figure.")
            continue
        _, probe = found
        out.notes += [f"{m}: {n}" for n in probe.get("notes", [])]
        if probe.get("dilution"):
            out.dilution[m] = probe["dilution"]
        temps = probe.get("temperatures")
        if temps and probe.get("tokens"):
            out.temperatures[m] = {
                "tokens": probe["tokens"],
                "values": temps["query"]["mean"],
                "target": "query",
                "layer": "mean",
            }
    return out


# ----------------------------------------------------------------------------------------------- writers


def _fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _params(p: dict | None) -> tuple[str, str, str]:
    if not p:
        return "n/a", "n/a", "n/a"
    return f"{int(p.get('total', 0)):,}", f"{int(p.get('new', 0)):,}", f"{float(p.get('percent', 0.0)):.3f} %"


def _speed(d: dict[str, Any], baseline: str, name: str) -> str:
    if name == baseline:
        return "1.00x (baseline)"
    if d["speedup"] is None:
        return "not reached"
    return f"{d['speedup']:.2f}x"


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m, d in summary["methods"].items():
        total, new, pct = _params(d.get("parameters"))
        rows.append(
            [
                m,
                str(d["runs"]),
                _fmt(d["final_val_ppl"], d["final_val_ppl_std"]),
                _fmt(d["final_val_loss"], d["final_val_loss_std"], 4),
                _fmt(d["tokens_per_s"], d["tokens_per_s_std"], 0),
                "n/a" if d["tokens_to_target"] is None else f"{d['tokens_to_target']:,.0f}",
                _speed(d, summary["baseline"], m),
                total,
                new,
                pct,
            ]
        )
    return rows


HEADER = [
    "method",
    "seeds",
    "val ppl (mean ± std)",
    "val loss",
    "tokens/s",
    "tokens to target",
    "speed-up",
    "parameters",
    "new",
    "overhead",
]


def summary_table(summary: dict[str, Any]) -> str:
    """The results table of ``summarise``'s output, as Markdown."""
    return stats.markdown_table(HEADER, table_rows(summary))


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 70em; margin: 2em auto;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #7a4a00; background: #fff7e6; padding: 0.4em 0.8em; border-left: 3px solid #f0a020; }
code { background: #f4f4f4; padding: 1px 4px; }
"""


def build_report(
    run_dirs: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    title: str = "SSA vs vanilla",
    labels: list[str] | None = None,
    baseline: str | None = None,
    probe: bool = True,
    extra_html: str = "",
    extra_md: str = "",
) -> dict[str, Any]:
    """Write OUT/report.html, OUT/report.md, OUT/report.json and OUT/figures/*.png; return the JSON summary.

    Reads only the run directories' JSON. The temperature and dilution figures come from each run's
    ``probe.json``: call ``selective_attention.evaluate.probe.probe_runs(run_dirs)`` first to have them;
    ``probe=False`` leaves them out even when present."""
    from selective_attention.report.viz import FRAGMENT_CSS, temperature_html_fragment, write_temperature_png

    if not run_dirs:
        raise UserError("give at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"{len(labels)} labels for {len(run_dirs)} run directories")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    groups = group_runs(runs)
    summary = summarise(groups, baseline)
    out = Path(out)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, str] = {}
    notes: list[str] = []
    plot_curves(groups, figdir / "val_ppl.png", summary["target_val_ppl"])
    figures["val_ppl"] = "figures/val_ppl.png"
    if plot_parameters(summary["methods"], figdir / "parameters.png"):
        figures["parameters"] = "figures/parameters.png"
    probes = collect_probes(groups) if probe else Probes(notes=["model probes skipped"])
    notes += probes.notes
    if probes.dilution:
        plot_dilution(probes.dilution, figdir / "dilution.png")
        figures["dilution"] = "figures/dilution.png"
    temp_frags = []
    for m, t in probes.temperatures.items():
        name = f"temperatures_{_slug(m)}.png"
        write_temperature_png(
            figdir / name,
            t["tokens"],
            t["values"],
            title=f"{m}: query inverse temperature tau_q per token (mean over layers and heads)",
        )
        figures[f"temperatures_{m}"] = f"figures/{name}"
        temp_frags.append((m, name, temperature_html_fragment(t["tokens"], t["values"])))
    summary.update(
        {
            "title": title,
            "figures": figures,
            "notes": notes,
            "dilution": probes.dilution,
            "temperatures": {
                m: {k: t[k] for k in ("tokens", "values", "target", "layer")} for m, t in probes.temperatures.items()
            },
        }
    )
    atomic_write_json(out / "report.json", summary)
    atomic_write_text(out / "report.md", _markdown(summary, figures, extra_md))
    atomic_write_text(out / "report.html", _html(summary, figures, temp_frags, extra_html, CSS + FRAGMENT_CSS))
    return summary


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def _speedup_sentences(summary: dict[str, Any]) -> list[str]:
    b, tgt = summary["baseline"], summary["target_val_ppl"]
    if tgt is None:
        return ["No validation curve: no speed-up can be computed."]
    bt = summary["baseline_tokens_to_target"]
    out = [
        f"Target: the baseline ({b}) final validation perplexity {tgt:.3f}, first reached by {b} after "
        f"{bt:,.0f} tokens."
        if bt
        else f"Target: {b}'s final validation perplexity {tgt:.3f}."
    ]
    for m, d in summary["methods"].items():
        if m == b:
            continue
        if d["tokens_to_target"] is None:
            out.append(f"{m}: did not reach {tgt:.3f} within its budget (not reached).")
        else:
            out.append(
                f"{m}: reached it after {d['tokens_to_target']:,.0f} tokens, "
                f"a {d['speedup']:.2f}x tokens-to-target speed-up."
            )
    return out


def _markdown(summary: dict[str, Any], figures: dict[str, str], extra: str) -> str:
    parts = [f"# {summary['title']}", "", summary_table(summary), ""]
    parts += [f"- {s}" for s in _speedup_sentences(summary)] + [""]
    captions = {
        "val_ppl": "Validation perplexity and training loss vs tokens",
        "dilution": "Attention dilution: row entropy and max weight vs query position",
        "parameters": "Parameter overhead",
    }
    for k, rel in figures.items():
        parts += [f"![{captions.get(k, k)}]({rel})", ""]
    if summary["notes"]:
        parts += ["Notes:"] + [f"- {n}" for n in summary["notes"]] + [""]
    if extra:
        parts += [extra, ""]
    return "\n".join(parts)


def _html(
    summary: dict[str, Any], figures: dict[str, str], temp_frags: list[tuple[str, str, str]], extra: str, css: str
) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    body_rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table_rows(summary))
    parts = [
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(summary["title"])}'
        f"</title><style>{css}</style></head><body>",
        f"<h1>{e(summary['title'])}</h1>",
        "<h2>Results</h2>",
        f"<table><tr>{head}</tr>{body_rows}</table>",
        "<p>Mean ± standard deviation over seeds (sample std; 0 with one seed). Speed-up: tokens the baseline "
        "needs to reach its own final validation perplexity / tokens the method needs to reach that same "
        "perplexity (first crossing, linear interpolation between evaluations).</p>",
        "<ul>" + "".join(f"<li>{e(s)}</li>" for s in _speedup_sentences(summary)) + "</ul>",
    ]
    if extra:
        parts.append(extra)
    parts += ["<h2>Training curves</h2>", f'<img src="{figures["val_ppl"]}" alt="validation perplexity vs tokens">']
    if temp_frags:
        parts.append("<h2>Per-token temperatures (Figure 1 style)</h2>")
        for m, name, frag in temp_frags:
            parts += [f"<h3>{e(m)}</h3>", f'<img src="figures/{name}" alt="temperatures of {e(m)}">', frag]
    if "dilution" in figures:
        parts += [
            "<h2>Attention dilution</h2>",
            "<p>Mean over layers, heads and validation sequences. A uniform row over p keys has entropy "
            "log p; dilution is the entropy following that line.</p>",
            f'<img src="{figures["dilution"]}" alt="attention dilution">',
        ]
    if "parameters" in figures:
        parts += ["<h2>Parameter overhead</h2>", f'<img src="{figures["parameters"]}" alt="parameter overhead">']
    if summary["notes"]:
        parts += ["<h2>Notes</h2>"] + [f'<p class="note">{e(n)}</p>' for n in summary["notes"]]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def is_png(path: str | os.PathLike) -> bool:
    """A complete PNG file: signature, IHDR first, IEND last, non-trivial size."""
    import struct

    p = Path(path)
    if not p.is_file():
        return False
    data = p.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return False
    w, h = struct.unpack(">II", data[16:24])
    return w > 0 and h > 0 and data.endswith(b"IEND\xaeB`\x82")


def broken_images(report_html: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(every <img> src of the report, the ones that are not relative paths to valid PNG files)."""
    import re

    report_html = Path(report_html)
    srcs = re.findall(r'<img[^>]*\bsrc="([^"]+)"', report_html.read_text(encoding="utf-8"))
    bad = [
        s
        for s in srcs
        if s.startswith(("/", "http:", "https:", "file:", "data:")) or not is_png(report_html.parent / s)
    ]
    return srcs, bad
