"""The per-token temperature section of the report: each method's sample text once, coloured on one scale that all
methods share, with the temperature's two terms apart.

tau(x, p) = 1 + c log p + tanh f(x). The position term 1 + c log p grows along any text whatever its words, so a
picture of tau darkens from left to right and hides what the tokens do; the colours therefore show the token term
tanh f(x) (diverging, centred on 0), and the position term, a function of the position only, is a line plot.
Probes written before the two terms were recorded apart (probe format 1) have only tau: those methods show tau on
a scale of their own (the same for all of them), and the caption says so.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from selective_attention.report.figures import plot_position_terms
from selective_attention.report.probes import Temperatures
from selective_attention.report.viz import (
    ColourScale,
    temperature_html_fragment,
    term_titles,
    token_term_scale,
    write_temperature_png,
)

SPLIT_CAPTION = (
    "Each token is coloured by the token term tanh f(x) of its query temperature (mean over layers and heads), on "
    "one scale shared by every method. The position term 1 + c log p depends on the position only (it is the same "
    "for any text), so it is plotted below instead of coloured: tau = position term + token term. Hover a token "
    "for its three numbers."
)
TOTAL_CAPTION = (
    "Colours: the total tau = 1 + c log p + tanh f(x) (mean over layers and heads). This probe.json predates the "
    "split of the two terms (probe format 1), so the position term, which grows along the text whatever the words, "
    "is part of the colour; run `ssa report` on the run with its final/ model to probe it again and show the token "
    "term alone."
)


def slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


@dataclass
class MethodPicture:
    method: str
    fragment: str  # inline HTML: the tokens on their colours, with the legend
    png: str  # relative path of the same picture as a PNG (for report.md)
    split: bool  # token term (True) or the total tau of an old probe (False)


@dataclass
class TemperatureSection:
    pictures: list[MethodPicture] = field(default_factory=list)
    position_png: str | None = None  # the position terms' line plot, when any probe has the split

    @property
    def captions(self) -> list[str]:
        kinds = {p.split for p in self.pictures}
        out = [SPLIT_CAPTION] if True in kinds else []
        if False in kinds:
            old = ", ".join(p.method for p in self.pictures if not p.split)
            out.append(f"{old}: {TOTAL_CAPTION}")
        return out

    def html(self) -> str:
        if not self.pictures:
            return ""
        parts = ["<h2>Per-token query temperatures (Figure 1 style)</h2>"]
        parts += [f'<p class="caption">{html.escape(c)}</p>' for c in self.captions]
        for p in self.pictures:
            parts += [f"<h3>{html.escape(p.method)}</h3>", p.fragment]
        if self.position_png:
            parts.append(f'<img src="{self.position_png}" alt="position term 1 + c log p per method">')
        return "\n".join(parts)

    def markdown(self) -> list[str]:
        if not self.pictures:
            return []
        lines = ["## Per-token query temperatures", ""]
        lines += [x for c in self.captions for x in (c, "")]
        for p in self.pictures:
            what = "token term tanh f(x)" if p.split else "tau (old probe: both terms)"
            lines += [f"![{p.method}: {what} per token]({p.png})", ""]
        if self.position_png:
            lines += [f"![Position term 1 + c log p]({self.position_png})", ""]
        return lines


def temperature_section(temps: dict[str, Temperatures], figdir: Path) -> TemperatureSection:
    """Write each method's picture (figdir/temperatures_METHOD.png) and the position-term plot
    (figdir/temperature_position.png); return the section that shows them."""
    section = TemperatureSection()
    split = {m: t for m, t in temps.items() if t.split}
    total = {m: t for m, t in temps.items() if not t.split}
    scales: dict[bool, ColourScale] = {}
    if split:
        scales[True] = token_term_scale([v for t in split.values() for v in t.token_term or []])
    if total:
        scales[False] = ColourScale.spanning([v for t in total.values() for v in t.values])
    for m, t in temps.items():
        scale = scales[t.split]
        values = t.token_term if t.split and t.token_term is not None else t.values
        name = f"temperatures_{slug(m)}.png"
        what = "token term tanh f(x)" if t.split else "inverse temperature tau (both terms: an old probe)"
        title = f"{m}: query {what} per token (mean over layers and heads)"
        write_temperature_png(figdir / name, t.tokens, values, title=title, scale=scale)
        frag = temperature_html_fragment(
            t.tokens, values, scale=scale, titles=term_titles(t.values, t.token_term, t.position_term)
        )
        section.pictures.append(MethodPicture(m, frag, f"figures/{name}", t.split))
    if split:
        plot_position_terms({m: t.position_term or [] for m, t in split.items()}, figdir / "temperature_position.png")
        section.position_png = "figures/temperature_position.png"
    return section
