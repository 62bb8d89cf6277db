"""report/markdown: the summaries' Markdown as HTML (headings, tables, lists, inline marks), escaped."""

from __future__ import annotations

import re

from selective_attention.report.markdown import inline, markdown_to_html

SUMMARY = """# Language-model study (budget demo)

## sotu (unigram perplexity floor 548.4)

| method | val ppl | verdict |
|---|---|---|
| vanilla | 235.13 ± 10.65 | - |
| ssa | 227.92 ± 3.58 | tie |

Paired change of perplexity vs vanilla
by evaluation length (95 % CI):

- ssa: @512: -3.10 % (tie)
- ssa-mlp: @512: **-1.00 %** with `c=0.1`
  and a continuation line
"""


def _cells(fragment: str, tag: str) -> list[str]:
    return re.findall(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", fragment)


def test_summary_renders_as_headings_table_paragraph_and_list():
    out = markdown_to_html(SUMMARY, heading_offset=1)
    assert "<h2>Language-model study (budget demo)</h2>" in out
    assert "<h3>sotu (unigram perplexity floor 548.4)</h3>" in out
    assert _cells(out, "th") == ["method", "val ppl", "verdict"]
    assert _cells(out, "td") == ["vanilla", "235.13 ± 10.65", "-", "ssa", "227.92 ± 3.58", "tie"]
    assert "<p>Paired change of perplexity vs vanilla by evaluation length (95 % CI):</p>" in out
    assert _cells(out, "li") == [
        "ssa: @512: -3.10 % (tie)",
        "ssa-mlp: @512: <strong>-1.00 %</strong> with <code>c=0.1</code> and a continuation line",
    ]
    assert "|" not in out and "#" not in out and "<pre" not in out  # nothing left as raw Markdown


def test_a_header_with_a_cell_more_than_its_separator_still_renders_every_cell():
    """The dilution table a reviewer found: 5 header cells over a 4-cell separator. GitHub would show it as text;
    here it is a table as wide as its widest row, short rows padded."""
    md = "| method | a | b | c | passkey |\n|---|---|---|---|\n| vanilla | 1 | 2 | 3 |\n| ssa | 1 | 2 | 3 | 4 |\n"
    out = markdown_to_html(md)
    assert _cells(out, "th") == ["method", "a", "b", "c", "passkey"]
    rows = re.findall(r"<tr>(.*?)</tr>", out)[1:]
    assert [_cells(r, "td") for r in rows] == [["vanilla", "1", "2", "3", ""], ["ssa", "1", "2", "3", "4"]]


def test_table_alignment_pipes_in_code_and_escapes():
    md = "| name | value |\n|:---|---:|\n| `a|b` | x \\| y |\n"
    out = markdown_to_html(md)
    assert '<th style="text-align:left">name</th><th style="text-align:right">value</th>' in out
    assert _cells(out, "td") == ["<code>a|b</code>", "x | y"]


def test_inline_marks_links_images_and_html_escaping():
    assert inline("a <b> & c") == "a &lt;b&gt; &amp; c"
    assert inline("**x** and *y* but 2 * 3 * 4") == "<strong>x</strong> and <em>y</em> but 2 * 3 * 4"
    assert inline("`<x>` **`y`**") == "<code>&lt;x&gt;</code> <strong><code>y</code></strong>"
    assert inline('![fig "1"](lm-sotu.png)') == '<img src="lm-sotu.png" alt="fig &quot;1&quot;">'
    assert inline("[docs](docs/results.md)") == '<a href="docs/results.md">docs</a>'
    assert inline("[x](javascript:alert(1))") == '<a href="#">x</a>)'  # only relative and http(s) targets
    assert "ssa_eager_mode" in inline("ssa_eager_mode")  # underscores are not emphasis


def test_numbered_list_and_fenced_code():
    out = markdown_to_html("1. one\n2. two\n\n```\n| not | a table |\n<tag>\n```\n")
    assert "<ol><li>one</li><li>two</li></ol>" in out
    assert "<pre><code>| not | a table |\n&lt;tag&gt;</code></pre>" in out
