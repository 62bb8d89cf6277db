"""The report's text: the results table, the tokens-to-target sentences, report.md and report.html.

Wording rule: a tokens-to-target ratio is a "speed-up" only when the paired comparison over seeds says the method
is better (``report.stats.ratio_claim``); otherwise the ratio is given with why it is not one ("within noise: tie",
"one seed: no interval").
"""

from __future__ import annotations

import html
from typing import Any

from selective_attention.report.markdown import markdown_to_html
from selective_attention.report.stats import ratio_claim
from selective_attention.report.temperatures import TemperatureSection
from selective_attention.report.viz import FRAGMENT_CSS
from selective_attention.utils import stats

HEADER = [
    "method",
    "seeds",
    "val ppl (mean ± std)",
    "val loss",
    "tokens/s",
    "tokens to target",
    "tokens-to-target ratio",
    "parameters",
    "new",
    "overhead",
]

RATIO_EXPLAINED = (
    "Mean ± standard deviation over seeds (sample std; 0 with one seed). Tokens-to-target ratio: tokens the "
    "baseline needs to reach its own final validation perplexity / tokens the method needs to reach that same "
    "perplexity (first crossing on the mean curve over seeds, linear interpolation between evaluations). It is "
    "called a speed-up only when the paired comparison of final validation perplexity (same seeds, 95 % Student-t "
    "interval) says the method is better; otherwise the ratio is within noise."
)

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 70em; margin: 2em auto;
       padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
.md-table, .results { overflow-x: auto; max-width: 100%; }
pre { overflow-x: auto; white-space: pre-wrap; background: #f8f8f8; padding: 0.6em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #7a4a00; background: #fff7e6; padding: 0.4em 0.8em; border-left: 3px solid #f0a020; }
code { background: #f4f4f4; padding: 1px 4px; }
"""


def _fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _params(p: dict[str, Any] | None) -> tuple[str, str, str]:
    if not p:
        return "n/a", "n/a", "n/a"
    return f"{int(p.get('total', 0)):,}", f"{int(p.get('new', 0)):,}", f"{float(p.get('percent', 0.0)):.3f} %"


def _ratio_cell(d: dict[str, Any], baseline: str, name: str) -> str:
    if name == baseline:
        return "1.00x (baseline)"
    if d["speedup"] is None:
        return "not reached"
    return f"{d['speedup']:.2f}x ({ratio_claim(d)})"


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
                _ratio_cell(d, summary["baseline"], m),
                total,
                new,
                pct,
            ]
        )
    return rows


def summary_table(summary: dict[str, Any]) -> str:
    """The results table of ``summarise``'s output, as Markdown."""
    return stats.markdown_table(HEADER, table_rows(summary))


def _paired_clause(d: dict[str, Any], baseline: str) -> str:
    """The paired comparison of final validation perplexity, and what it allows the ratio to be called."""
    p, ratio = d.get("paired_val_ppl_percent"), d["speedup"]
    if p is None:
        return f"no run shares a seed with {baseline}, so there is no paired comparison: not evidence of a speed-up"
    if p["low"] is None:
        return f"final val ppl {p['mean']:+.2f} % vs {baseline} ({p['verdict']}): not evidence of a speed-up"
    head = (
        f"final val ppl {p['mean']:+.2f} % vs {baseline}, paired over {p['n']} seeds "
        f"[95 % CI {p['low']:+.2f}, {p['high']:+.2f}]"
    )
    claim = ratio_claim(d)
    if claim == "speed-up":
        return f"{head}: better, a {ratio:.2f}x tokens-to-target speed-up"
    if claim == "slow-down":
        return f"{head}: worse, and slower to the target"
    if claim == "within noise: tie":
        return f"{head}: within noise (tie), so not a speed-up"
    return f"{head}: {claim}"


def speedup_sentences(summary: dict[str, Any]) -> list[str]:
    b, tgt = summary["baseline"], summary["target_val_ppl"]
    if tgt is None:
        return ["No validation curve: no tokens-to-target ratio can be computed."]
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
        elif d["speedup"] is None:
            out.append(f"{m}: reached it after {d['tokens_to_target']:,.0f} tokens.")
        else:
            out.append(
                f"{m}: reached it after {d['tokens_to_target']:,.0f} tokens, tokens-to-target ratio "
                f"{d['speedup']:.2f}x; {_paired_clause(d, b)}."
            )
    return out


FIGURE_CAPTIONS = {
    "val_ppl": "Validation perplexity and training loss vs tokens",
    "dilution": "Attention dilution: row entropy and max weight vs query position",
    "parameters": "Parameter overhead",
}


def markdown_report(
    summary: dict[str, Any], figures: dict[str, str], temperatures: TemperatureSection, extra: str, section: str = ""
) -> str:
    """report.md: title, table, sentences, figures (each once), notes, then ``extra`` and ``section`` verbatim."""
    parts = [f"# {summary['title']}", "", summary_table(summary), ""]
    parts += [f"- {s}" for s in speedup_sentences(summary)] + [""]
    parts += [f"![{FIGURE_CAPTIONS['val_ppl']}]({figures['val_ppl']})", ""]
    parts += temperatures.markdown()
    for k in ("dilution", "parameters"):
        if k in figures:
            parts += [f"![{FIGURE_CAPTIONS[k]}]({figures[k]})", ""]
    if summary["notes"]:
        parts += ["Notes:"] + [f"- {n}" for n in summary["notes"]] + [""]
    if extra:
        parts += [extra, ""]
    if section:
        parts += [section, ""]
    return "\n".join(parts)


def html_report(
    summary: dict[str, Any], figures: dict[str, str], temperatures: TemperatureSection, extra: str, section: str = ""
) -> str:
    """report.html: the same content; ``extra`` is HTML placed after the results, ``section`` Markdown rendered to
    HTML (tables as tables) below it."""
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    body_rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table_rows(summary))
    parts = [
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(summary["title"])}'
        f"</title><style>{CSS + FRAGMENT_CSS}</style></head><body>",
        f"<h1>{e(summary['title'])}</h1>",
        "<h2>Results</h2>",
        f'<div class="results"><table><tr>{head}</tr>{body_rows}</table></div>',
        f"<p>{e(RATIO_EXPLAINED)}</p>",
        "<ul>" + "".join(f"<li>{e(s)}</li>" for s in speedup_sentences(summary)) + "</ul>",
    ]
    if extra:
        parts.append(extra)
    if section:
        parts.append(f'<section class="md">{markdown_to_html(section, heading_offset=1)}</section>')
    parts += ["<h2>Training curves</h2>", f'<img src="{figures["val_ppl"]}" alt="validation perplexity vs tokens">']
    if temperatures.pictures:
        parts.append(temperatures.html())
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
