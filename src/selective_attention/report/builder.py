"""The report of a set of training runs: HTML (relative PNG paths), Markdown and JSON (``build_report``).

Input: run directories in the trainer's layout (``metrics.jsonl``, ``run.json``), optionally with the
``probe.json`` that ``selective_attention.evaluate.probe.probe_run`` writes from the run's ``final/`` model.
This package only reads JSON: it never loads a model or a corpus.
Runs are grouped into methods (vanilla, ssa, ssa-mlp, ... or explicit labels), seeds are averaged.

- validation perplexity vs tokens, per method (mean over seeds, each seed faint);
- the tokens-to-target ratio against the baseline, called a speed-up only when the paired comparison over seeds
  says the method is better (``report.stats``);
- a mean +- std table over seeds; parameter overhead;
- from ``probe.json``, when present: a Figure-1-style per-token picture of the query temperature's token term,
  the position term apart (``report.temperatures``), and the dilution plot (attention entropy and max weight vs
  query position).

The modules, by concern: ``load`` (run directories -> records), ``stats`` (summaries), ``probes`` (probe.json),
``figures`` (matplotlib), ``temperatures`` and ``viz`` (the per-token pictures), ``markdown`` (Markdown -> HTML),
``render`` (report.md / report.html), ``check`` (images of a written report). The names below are the package's
entry points, kept importable from here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError
from selective_attention.report.check import broken_images, is_png
from selective_attention.report.figures import plot_curves, plot_dilution, plot_parameters
from selective_attention.report.load import RunRecord, group_runs, load_run, method_label
from selective_attention.report.probes import PROBE_FILE, Probes, collect_probes, read_probe
from selective_attention.report.render import html_report, markdown_report, summary_table, table_rows
from selective_attention.report.stats import mean_curve, summarise
from selective_attention.report.temperatures import temperature_section
from selective_attention.utils.io import atomic_write_json, atomic_write_text

__all__ = [
    "PROBE_FILE",
    "Probes",
    "RunRecord",
    "broken_images",
    "build_report",
    "collect_probes",
    "group_runs",
    "is_png",
    "load_run",
    "mean_curve",
    "method_label",
    "read_probe",
    "summarise",
    "summary_table",
    "table_rows",
]


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
    markdown_section: str = "",
) -> dict[str, Any]:
    """Write OUT/report.html, OUT/report.md, OUT/report.json and OUT/figures/*.png; return the JSON summary.

    Reads only the run directories' JSON. The temperature and dilution figures come from each run's
    ``probe.json``: call ``selective_attention.evaluate.probe.probe_runs(run_dirs)`` first to have them;
    ``probe=False`` leaves them out even when present. ``extra_html`` goes into report.html only, ``extra_md``
    into report.md only; ``markdown_section`` (e.g. an experiment's summary.md) into both: verbatim in report.md,
    rendered as HTML (headings, tables, lists) in report.html."""
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
    plot_curves(groups, figdir / "val_ppl.png", summary["target_val_ppl"])
    figures["val_ppl"] = "figures/val_ppl.png"
    if plot_parameters(summary["methods"], figdir / "parameters.png"):
        figures["parameters"] = "figures/parameters.png"
    probes = collect_probes(groups) if probe else Probes(notes=["model probes skipped"])
    if probes.dilution:
        plot_dilution(probes.dilution, figdir / "dilution.png")
        figures["dilution"] = "figures/dilution.png"
    section = temperature_section(probes.temperatures, figdir)
    for pic in section.pictures:
        figures[f"temperatures_{pic.method}"] = pic.png
    if section.position_png:
        figures["temperature_position"] = section.position_png
    summary.update(
        {
            "title": title,
            "figures": figures,
            "notes": list(probes.notes),
            "dilution": probes.dilution,
            "temperatures": {m: t.as_json() for m, t in probes.temperatures.items()},
        }
    )
    atomic_write_json(out / "report.json", summary)
    atomic_write_text(out / "report.md", markdown_report(summary, figures, section, extra_md, markdown_section))
    atomic_write_text(out / "report.html", html_report(summary, figures, section, extra_html, markdown_section))
    return summary
