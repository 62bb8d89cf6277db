"""Figure-1-style pictures: every token of a text coloured by its learned SSA temperature.

The paper's Figure 1 highlights each token by its temperature. Colour encodes one quantity on one ``ColourScale``.
tau = 1 + c log p + tanh f(x) has two terms, and the position term grows along any text whatever its words, so a
picture of tau darkens from left to right and hides what the tokens do: ``ssa viz`` and the report colour the token
term tanh f(x) on a diverging scale centred on 0 (red: a sharper row for that query than its position alone gives;
blue: flatter); ``--term position`` and ``--term total`` (tau itself: darker = larger = sparser) span the values
shown. Each token's tooltip gives all three numbers. The legend gives the range.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib.colors import ListedColormap, Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

CMAP = "Blues"
DIVERGING_CMAP = "RdBu_r"  # blue below 0, white at 0, red above


@dataclass(frozen=True)
class ColourScale:
    """Values lo..hi onto a colour map; ``diverging`` maps (lo + hi) / 2 to the map's white middle."""

    lo: float
    hi: float
    cmap: str = CMAP
    label: str = "tau"
    meaning: str = "darker = larger inverse temperature = sparser attention"
    diverging: bool = False

    @classmethod
    def spanning(cls, values: Iterable[float], **kw: Any) -> ColourScale:
        """From the smallest to the largest of ``values``."""
        vals = list(values)
        return cls(min(vals), max(vals), **kw)

    @classmethod
    def centred(cls, values: Iterable[float], floor: float = 1e-6, **kw: Any) -> ColourScale:
        """Symmetric about 0 (-m..m, m the largest |value| but at least ``floor``), on the diverging map."""
        m = max(max((abs(v) for v in values), default=0.0), floor)
        return cls(-m, m, **{"cmap": DIVERGING_CMAP, "diverging": True, **kw})

    def position(self, v: float) -> float:
        """v on the scale, 0..1 (clipped)."""
        span = self.hi - self.lo
        return 0.0 if span < 1e-12 else min(1.0, max(0.0, (v - self.lo) / span))

    def _shade(self, x: float) -> float:
        # avoid pure white and the darkest end (Blues); keep the diverging map's ends readable
        return 0.1 + 0.8 * x if self.diverging else 0.08 + 0.8 * x

    def rgb(self, v: float) -> tuple[int, int, int]:
        r, g, b, _ = colormaps[self.cmap](self._shade(self.position(v)))
        return int(255 * r), int(255 * g), int(255 * b)

    def dark(self, v: float) -> bool:
        """Whether a token on this colour needs white text."""
        x = self.position(v)
        return abs(x - 0.5) > 0.32 if self.diverging else x > 0.55

    def gradient_css(self) -> str:
        stops = [self.rgb(self.lo + (self.hi - self.lo) * i / 4) for i in range(5)]
        return "linear-gradient(90deg," + ",".join(f"rgb{s}" for s in stops) + ")"

    def matplotlib_colormap(self) -> ListedColormap:
        return ListedColormap([colormaps[self.cmap](self._shade(i / 255)) for i in range(256)])


def _visible(token: str) -> str:
    return token.replace("\n", "\u21b5 ")


def _check(tokens: Sequence[str], values: Sequence[float]) -> None:
    if len(tokens) != len(values) or not tokens:
        raise ValueError("tokens and values must be non-empty and of equal length")


def temperature_html_fragment(
    tokens: Sequence[str],
    values: Sequence[float],
    caption: str = "",
    scale: ColourScale | None = None,
    titles: Sequence[str] | None = None,
) -> str:
    """An inline HTML block (no external assets): one <span> per token, background = its value on ``scale``
    (default: tau, spanning the values shown); each token's tooltip is ``titles[i]`` (default "tau=...")."""
    _check(tokens, values)
    scale = scale or ColourScale.spanning(values)
    titles = titles or [f"tau={v:.4f}" for v in values]
    spans = []
    for tok, v, title in zip(tokens, values, titles):
        r, g, b = scale.rgb(v)
        fg = "#fff" if scale.dark(v) else "#000"
        spans.append(
            f'<span class="tok" style="background:rgb({r},{g},{b});color:{fg}" '
            f'title="{html.escape(title)}">{html.escape(_visible(tok))}</span>'
        )
    num = "+.3f" if scale.diverging else ".3f"  # a signed term reads better with its sign
    legend = (
        f'<div class="legend">{html.escape(scale.label)} {scale.lo:{num}} <span class="bar" '
        f'style="background:{scale.gradient_css()}"></span> {scale.hi:{num}} &nbsp; '
        f"({html.escape(scale.meaning)})</div>"
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
    path: str | Path,
    tokens: list[str],
    values: list[float],
    title: str,
    caption: str = "",
    scale: ColourScale | None = None,
    titles: Sequence[str] | None = None,
) -> Path:
    from selective_attention.utils.io import atomic_write_text

    body = temperature_html_fragment(tokens, values, caption, scale, titles)
    doc = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}{FRAGMENT_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )
    return atomic_write_text(path, doc)


def write_temperature_png(
    path: str | Path,
    tokens: Sequence[str],
    values: Sequence[float],
    title: str = "",
    width_chars: int = 90,
    scale: ColourScale | None = None,
) -> Path:
    """Tokens laid out as wrapped text, each on a box coloured by its value on ``scale`` (default: tau spanning
    the values shown), with a colour bar."""
    from selective_attention.utils.io import atomic_write

    _check(tokens, values)
    scale = scale or ColourScale.spanning(values)
    # Lay out on a character grid: x in character units, one row per line.
    lines: list[list[tuple[str, float]]] = [[]]
    col = 0
    for tok, v in zip(tokens, values):
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
            lines[-1].append((part, v))
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
        for part, v in line:
            r, g, b = scale.rgb(v)
            ax.add_patch(Rectangle((col, row + 0.1), len(part), 0.8, color=(r / 255, g / 255, b / 255), lw=0))
            ax.text(
                col,
                row + 0.5,
                part,
                va="center",
                ha="left",
                family="monospace",
                fontsize=fs,
                color="white" if scale.dark(v) else "black",
            )
            col += len(part)
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    cax = fig.add_axes((0.3, 0.5 / fig_h, 0.4, 0.18 / fig_h))
    sm = plt.cm.ScalarMappable(cmap=scale.matplotlib_colormap(), norm=Normalize(scale.lo, scale.hi))
    cb = fig.colorbar(sm, cax=cax, orientation="horizontal")
    cb.ax.tick_params(labelsize=7)
    cb.set_label(f"{scale.label} ({scale.meaning})", fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


TERMS = ("token", "position", "total")
# The token term's scale reaches at least +-0.05: an untrained token term (|tanh f| ~ 1e-3) stays near white
# instead of being stretched into full colours that look like an effect.
TOKEN_TERM_FLOOR = 0.05
TOKEN_TERM_MEANING = "red: tau above its position term, a sharper row for that query; blue: below, flatter"


def token_term_scale(values: Iterable[float]) -> ColourScale:
    """The diverging scale of the token term tanh f(x), centred on 0 (see ``TOKEN_TERM_FLOOR``)."""
    return ColourScale.centred(values, floor=TOKEN_TERM_FLOOR, label="token term tanh f(x)", meaning=TOKEN_TERM_MEANING)


def term_titles(
    tau: Sequence[float], token: Sequence[float] | None = None, position: Sequence[float] | None = None
) -> list[str]:
    """Each token's tooltip: its three numbers when the probe holds the two terms apart, else tau alone."""
    if token is None or position is None:
        return [f"tau={v:.4f}" for v in tau]
    return [f"token term={k:+.4f}, position term={p:.4f}, tau={v:.4f}" for k, p, v in zip(token, position, tau)]


def select_temperatures(
    probe: dict[str, Any], target: str = "query", layer: int | str = "mean", term: str = "total"
) -> list[float] | None:
    """One row of a probe's temperatures (``selective_attention.evaluate.probe`` JSON): ``target`` in
    {"query", "value"}, ``layer`` "mean" (over layers) or an index (negative counts from the end), ``term`` one of
    ``TERMS``: the token term tanh f(x), the position term 1 + c log p, or their total tau. None for a term that a
    probe written before the two terms were recorded apart (probe format 1) does not hold."""
    from selective_attention.errors import UserError

    temps = probe.get("temperatures")
    if not temps or not probe.get("tokens"):
        raise UserError("the probe holds no temperatures (a vanilla model has none)")
    if target not in temps:
        raise UserError(f"target must be one of {', '.join(temps)}, got {target!r}")
    if term not in TERMS:
        raise UserError(f"term must be one of {', '.join(TERMS)}, got {term!r}")
    rows = temps[target] if term == "total" else temps[target].get(term)
    if rows is None:
        return None
    if layer == "mean":
        return list(rows["mean"])
    per_layer = rows["per_layer"]
    L = len(per_layer)
    if not -L <= int(layer) < L:
        raise UserError(f"layer {layer} out of range: the model has {L} layers")
    return list(per_layer[int(layer)])


_TERM_NAMES = {
    "token": "token term tanh f(x)",
    "position": "position term 1 + c log p",
    "total": "inverse temperature tau",
}


def render_temperatures(
    probe: dict[str, Any],
    out: str | Path,
    target: str = "query",
    layer: int | str = "mean",
    source: str = "",
    term: str = "token",
) -> str:
    """Write the probe's tokens coloured by one temperature row to ``out`` (.html or .png); return a one-line
    summary of what was written. ``term="token"`` (the default) colours the token term on a diverging scale centred
    on 0, because the position term grows along any text whatever its words and would hide what the tokens do."""
    from selective_attention.errors import UserError

    out = Path(out)
    values = select_temperatures(probe, target, layer, term)
    if values is None:
        raise UserError(
            f"this probe records tau only (probe format 1, before the two terms were recorded apart): use --term "
            f"total, or probe the model again (--model, or `ssa report` on its run) to show the {term} term"
        )
    tau = select_temperatures(probe, target, layer, "total") or values
    token = select_temperatures(probe, target, layer, "token")
    position = select_temperatures(probe, target, layer, "position")
    scale = token_term_scale(values) if term == "token" else ColourScale.spanning(values, label=_TERM_NAMES[term])
    tokens = probe["tokens"]
    where = "mean over layers" if layer == "mean" else f"layer {layer}"
    title = f"{target} {_TERM_NAMES[term]} per token ({where}, mean over heads): {source}"
    if out.suffix.lower() == ".html":
        caption = f"{len(tokens)} tokens, {probe['n_layers']} layers; tau = position term + token term"
        write_temperature_html(out, tokens, values, title, caption, scale, term_titles(tau, token, position))
    else:
        write_temperature_png(out, tokens, values, title=title, scale=scale)
    name = {"token": "token term", "position": "position term", "total": "tau"}[term]
    return f"{len(values)} tokens, {target} {name} from {min(values):.4f} to {max(values):.4f} ({where}); wrote {out}"
