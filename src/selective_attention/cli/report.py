"""``ssa report RUN_DIR...``: the HTML / Markdown / JSON report of training runs.

It first probes each run's ``final/`` model into ``RUN/probe.json`` (``evaluate.probe.probe_runs``; kept while the
model and settings are unchanged) unless ``--no-probe``, then renders the report from the runs' JSON only
(``report.builder.build_report``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from selective_attention.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training run directories (metrics.jsonl, run.json)")
    p.add_argument("--out", default=None, help="output folder (default: REPORT beside the runs' common parent)")
    p.add_argument("--title", default="SSA vs vanilla attention", help="report title")
    p.add_argument(
        "--labels",
        default=None,
        help="comma-separated method label per run dir (default: from run.json: vanilla, ssa, ssa-mlp)",
    )
    p.add_argument("--baseline", default=None, help="the method speed-ups are measured against (default vanilla)")
    p.add_argument("--text", default=None, help="sample text for the per-token temperature picture")
    p.add_argument(
        "--no-probe", action="store_true", help="skip loading the final models (no temperature or dilution figure)"
    )


def check_runs(runs: list[str]) -> None:
    for d in runs:
        if not Path(d).is_dir():
            raise UserError(f"not a directory: {d}")


def run(args: argparse.Namespace) -> int:
    check_runs(args.runs)
    if not args.no_probe:
        from selective_attention.evaluate.probe import probe_runs

        probe_runs(args.runs, text=args.text)
    return render(args)


def render(args: argparse.Namespace) -> int:
    """Build the report from the run directories' JSON (probe.json included) and print its table."""
    from selective_attention.report.builder import build_report, summary_table

    check_runs(args.runs)
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    out = Path(args.out) if args.out else Path(os.path.commonpath([os.path.abspath(d) for d in args.runs])) / "report"
    if len(args.runs) == 1 and not args.out:
        out = Path(args.runs[0]) / "report"
    summary = build_report(
        args.runs, out, title=args.title, labels=labels, baseline=args.baseline, probe=not args.no_probe
    )
    print(summary_table(summary))
    for n in summary["notes"]:
        print(f"note: {n}")
    print(f"report: {out / 'report.html'}")
    return 0
