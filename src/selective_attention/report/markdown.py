"""A small Markdown-to-HTML renderer for the subset the experiments' ``summary.md`` files use, so that the HTML
report shows them as headings, paragraphs, lists and tables instead of raw text (no Markdown package is a
dependency of the project).

Blocks: ATX headings (``#`` .. ``######``), pipe tables (a header row, a ``|---|`` separator, rows; a row with
fewer or more cells than the header is padded, never dropped), bullet (``-``, ``*``) and numbered (``1.``) lists
with indented continuation lines, fenced code blocks, paragraphs. Inline: ```code```, ``**bold**``, ``*italic*``,
``![alt](src)`` and ``[text](href)``. Everything else is text, HTML-escaped.
"""

from __future__ import annotations

import html
import re

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_BULLET = re.compile(r"^(\s*)[-*]\s+(.*)$")
_NUMBERED = re.compile(r"^(\s*)\d+[.)]\s+(.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`([^`]+)`")
_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_ITALIC = re.compile(r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])")


def _safe_url(url: str) -> str:
    """A relative path or http(s)/mailto address, attribute-escaped; anything else (javascript:, data:) is dropped."""
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", url)
    if scheme and scheme.group(1).lower() not in ("http", "https", "mailto"):
        return "#"
    return html.escape(url, quote=True)


def _attr(escaped: str) -> str:
    """Text already escaped for an element body, escaped for an attribute value (quotes too)."""
    return html.escape(html.unescape(escaped), quote=True)


def inline(text: str) -> str:
    """One line of inline Markdown as HTML (escaped)."""
    codes: list[str] = []

    def keep(m: re.Match[str]) -> str:
        codes.append(f"<code>{html.escape(m.group(1))}</code>")
        return f"\x00{len(codes) - 1}\x00"

    text = _CODE_SPAN.sub(keep, text)  # code spans first: nothing inside them is Markdown
    out = html.escape(text, quote=False)
    out = _IMAGE.sub(lambda m: f'<img src="{_safe_url(html.unescape(m.group(2)))}" alt="{_attr(m.group(1))}">', out)
    out = _LINK.sub(lambda m: f'<a href="{_safe_url(html.unescape(m.group(2)))}">{m.group(1)}</a>', out)
    out = _BOLD.sub(r"<strong>\1</strong>", out)
    out = _ITALIC.sub(r"<em>\1</em>", out)
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], out)


def _cells(row: str) -> list[str]:
    """The cells of a pipe-table row; a ``|`` inside a code span or escaped as ``\\|`` is text."""
    row = row.strip()
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|") and not row.endswith("\\|"):
        row = row[:-1]
    cells, cur, in_code, i = [], "", False, 0
    while i < len(row):
        ch = row[i]
        if ch == "\\" and i + 1 < len(row) and row[i + 1] == "|":
            cur, i = cur + "|", i + 2
            continue
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
        i += 1
    cells.append(cur.strip())
    return cells


def _alignments(separator: str) -> list[str]:
    out = []
    for c in _cells(separator):
        left, right = c.startswith(":"), c.endswith(":")
        out.append("center" if left and right else "right" if right else "left" if left else "")
    return out


def _table(lines: list[str]) -> str:
    """lines[0] the header, lines[1] the separator, the rest rows. The width is the widest of them all, so that a
    header with a cell more than its separator (or a short row) still lines up."""
    header, aligns, rows = _cells(lines[0]), _alignments(lines[1]), [_cells(r) for r in lines[2:]]
    width = max([len(header), *(len(r) for r in rows)])

    def cell(tag: str, text: str, j: int) -> str:
        a = aligns[j] if j < len(aligns) else ""
        style = f' style="text-align:{a}"' if a else ""
        return f"<{tag}{style}>{inline(text)}</{tag}>"

    def pad(r: list[str]) -> list[str]:
        return r + [""] * (width - len(r))

    head = "".join(cell("th", c, j) for j, c in enumerate(pad(header)))
    body = "".join("<tr>" + "".join(cell("td", c, j) for j, c in enumerate(pad(r))) + "</tr>" for r in rows)
    return f'<div class="md-table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _list_item(line: str) -> tuple[str, str] | None:
    """("ul" | "ol", the item's text) for a list line, else None."""
    if m := _BULLET.match(line):
        return "ul", m.group(2)
    if m := _NUMBERED.match(line):
        return "ol", m.group(2)
    return None


def markdown_to_html(text: str, heading_offset: int = 0) -> str:
    """``text`` (Markdown) as an HTML fragment; headings move down ``heading_offset`` levels (at most h6), e.g. 1
    to sit a document's ``#`` title under the report's own <h1>."""
    lines = text.splitlines()
    out: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            out.append("<p>" + " ".join(inline(s.strip()) for s in paragraph) + "</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
            i += 1
        elif fm := _FENCE.match(line):
            flush()
            fence = fm.group(1)
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(fence):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1 : j])) + "</code></pre>")
            i = j + 1
        elif m := _HEADING.match(line):
            flush()
            level = min(6, len(m.group(1)) + heading_offset)
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1]):
            flush()
            j = i + 2
            while j < len(lines) and lines[j].lstrip().startswith("|"):
                j += 1
            out.append(_table(lines[i:j]))
            i = j
        elif (item := _list_item(line)) is not None:
            flush()  # a list may start right under a paragraph line
            kind, items = item[0], [item[1]]
            j = i + 1
            while j < len(lines):
                nxt = _list_item(lines[j])
                if nxt is not None and nxt[0] == kind:
                    items.append(nxt[1])
                elif lines[j].startswith((" ", "\t")) and lines[j].strip():
                    items[-1] += " " + lines[j].strip()  # an indented continuation of the item
                else:
                    break
                j += 1
            out.append(f"<{kind}>" + "".join(f"<li>{inline(s)}</li>" for s in items) + f"</{kind}>")
            i = j
        else:
            paragraph.append(line)
            i += 1
    flush()
    return "\n".join(out)
