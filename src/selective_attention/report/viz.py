"""Figure-1-style pictures: every token of a text coloured by its learned SSA temperature.

The paper's Figure 1 highlights each token by its temperature; here colour encodes the inverse temperature
tau (the factor SSA multiplies into q or v): darker = larger tau = a sparser (more selective) attention row for
that query. The scale is normalised to the values shown, and the legend gives the actual range.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colormaps  # noqa: E402

CMAP = "Blues"


def _normalise(values: list[float]) -> tuple[list[float], float, float]:
    lo, hi = min(values), max(values)
    span = hi - lo
    return [0.0 if span < 1e-12 else (v - lo) / span for v in values], lo, hi


def _rgb(x: float) -> tuple[int, int, int]:
    r, g, b, _ = colormaps[CMAP](0.08 + 0.8 * x)  # avoid pure white and the darkest navy
    return int(255 * r), int(255 * g), int(255 * b)


def _visible(token: str) -> str:
    return token.replace("\n", "\u21b5 ")


def temperature_html_fragment(tokens: list[str], values: list[float], caption: str = "") -> str:
    """An inline HTML block (no external assets): one <span> per token, background = tau."""
    if len(tokens) != len(values) or not tokens:
        raise ValueError("tokens and values must be non-empty and of equal length")
    norm, lo, hi = _normalise(values)
    spans = []
    for tok, v, x in zip(tokens, values, norm):
        r, g, b = _rgb(x)
        fg = "#fff" if x > 0.55 else "#000"
        spans.append(
            f'<span class="tok" style="background:rgb({r},{g},{b});color:{fg}" '
            f'title="tau={v:.4f}">{html.escape(_visible(tok))}</span>'
        )
    lo_rgb, hi_rgb = _rgb(0.0), _rgb(1.0)
    legend = (
        f'<div class="legend">tau {lo:.3f} <span class="bar" style="background:linear-gradient(90deg,'
        f'rgb{lo_rgb},rgb{hi_rgb})"></span> {hi:.3f} &nbsp; (darker = larger inverse temperature = '
        f"sparser attention)</div>"
    )
    cap = f'<p class="caption">{html.escape(caption)}</p>' if caption else ""
    return f'<div class="temps">{"".join(spans)}</div>{legend}{cap}'


FRAGMENT_CSS = """
.temps { font-family: ui-monospace, Menlo, Consolas, monospace; line-height: 2.0; white-space: pre-wrap;
         border: 1px solid #ddd; padding: 0.6em; border-radius: 4px; }
.tok { padding: 2px 0; border-radius: 2px; }
.legend { font-size: 0.85em; color: #444; margin: 0.3em 0; }
.legend .bar { display: inline-block; width: 120px; height: 0.8em; vertical-align: middle; border: 1px solid #aaa; }
.caption { font-size: 0.9em; color: #333; }
"""


def write_temperature_html(
    path: str | Path, tokens: list[str], values: list[float], title: str, caption: str = ""
) -> Path:
    from selective_attention.utils.io import atomic_write_text

    body = temperature_html_fragment(tokens, values, caption)
    doc = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}{FRAGMENT_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
    return atomic_write_text(path, doc)


def write_temperature_png(
    path: str | Path, tokens: list[str], values: list[float], title: str = "", width_chars: int = 90
) -> Path:
    """Tokens laid out as wrapped text, each on a box coloured by tau, with a colour bar."""
    from selective_attention.utils.io import atomic_write

    if len(tokens) != len(values) or not tokens:
        raise ValueError("tokens and values must be non-empty and of equal length")
    norm, lo, hi = _normalise(values)
    # Lay out on a character grid: x in character units, one row per line.
    lines: list[list[tuple[str, float]]] = [[]]
    col = 0
    for tok, x in zip(tokens, norm):
        parts = tok.split("\n")
        for i, part in enumerate(parts):
            if i > 0:
                lines.append([])
                col = 0
            if not part:
                continue
            if col + len(part) > width_chars and col > 0:
                lines.append([])
                col = 0
            lines[-1].append((part, x))
            col += len(part)
    n_lines = len(lines)
    fs = 10
    char_w, line_h = 0.6 * fs / 72 / 0.96, 0.32  # inches: a monospace glyph is ~0.6 em wide
    fig_w = max(4.0, width_chars * char_w + 0.6)
    fig_h = n_lines * line_h + 1.4
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=110)
    ax = fig.add_axes((0.02, 1.0 / fig_h, 0.96, 1 - 1.3 / fig_h))
    ax.set_xlim(0, width_chars)
    ax.set_ylim(n_lines, 0)
    ax.axis("off")
    for row, line in enumerate(lines):
        col = 0
        for part, x in line:
            r, g, b = _rgb(x)
            ax.add_patch(plt.Rectangle((col, row + 0.1), len(part), 0.8, color=(r / 255, g / 255, b / 255), lw=0))
            ax.text(
                col,
                row + 0.5,
                part,
                va="center",
                ha="left",
                family="monospace",
                fontsize=fs,
                color="white" if x > 0.55 else "black",
            )
            col += len(part)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    cax = fig.add_axes((0.3, 0.5 / fig_h, 0.4, 0.18 / fig_h))
    shown = matplotlib.colors.ListedColormap([colormaps[CMAP](0.08 + 0.8 * i / 255) for i in range(256)])
    sm = plt.cm.ScalarMappable(cmap=shown, norm=matplotlib.colors.Normalize(lo, hi))
    cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
    cb.ax.tick_params(labelsize=7)
    cb.set_label("tau (darker = sparser attention)", fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


def select_temperatures(probe: dict, target: str = "query", layer: int | str = "mean") -> list[float]:
    """One row of a probe's temperatures (``selective_attention.evaluate.probe`` JSON): ``target`` in
    {"query", "value"}, ``layer`` "mean" (over layers) or an index (negative counts from the end)."""
    from selective_attention.errors import UserError

    temps = probe.get("temperatures")
    if not temps or not probe.get("tokens"):
        raise UserError("the probe holds no temperatures (a vanilla model has none)")
    if target not in temps:
        raise UserError(f"target must be one of {', '.join(temps)}, got {target!r}")
    if layer == "mean":
        return list(temps[target]["mean"])
    per_layer = temps[target]["per_layer"]
    L = len(per_layer)
    if not -L <= int(layer) < L:
        raise UserError(f"layer {layer} out of range: the model has {L} layers")
    return list(per_layer[int(layer)])


def render_temperatures(
    probe: dict, out: str | Path, target: str = "query", layer: int | str = "mean", source: str = ""
) -> str:
    """Write the probe's tokens coloured by one temperature row to ``out`` (.html or .png); return a one-line
    summary of what was written."""
    out = Path(out)
    values = select_temperatures(probe, target, layer)
    tokens = probe["tokens"]
    where = "mean over layers" if layer == "mean" else f"layer {layer}"
    title = f"{target} inverse temperature per token ({where}, mean over heads): {source}"
    if out.suffix.lower() == ".html":
        write_temperature_html(out, tokens, values, title, caption=f"{len(tokens)} tokens, {probe['n_layers']} layers")
    else:
        write_temperature_png(out, tokens, values, title=title)
    return f"{len(values)} tokens, tau_{target} from {min(values):.4f} to {max(values):.4f} ({where}); wrote {out}"
