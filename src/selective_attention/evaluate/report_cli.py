"""``ssa report RUN_DIR...``: probe each run's ``final/`` model into ``RUN/probe.json`` (kept while the model and
settings are unchanged), then render the report from JSON (``selective_attention.report.cli.render``)."""

from __future__ import annotations

import argparse

from selective_attention.report.cli import add_arguments, check_runs, render

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    check_runs(args.runs)
    if not args.no_probe:
        from selective_attention.evaluate.probe import probe_runs

        probe_runs(args.runs, text=args.text)
    return render(args)
