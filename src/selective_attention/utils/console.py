"""A rich console for result tables: at least 140 columns wide, so that a table printed to a pipe, a log or a
test's captured output (rich assumes 80 there) keeps every cell whole instead of cropping it to "compi…"."""

from __future__ import annotations

from rich.console import Console

MIN_TABLE_WIDTH = 140


def table_console(stderr: bool = False) -> Console:
    console = Console(stderr=stderr)
    console.width = max(console.width, MIN_TABLE_WIDTH)
    return console
