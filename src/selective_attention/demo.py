"""``ssa demo`` (``cli.demo``): SSA against vanilla attention on real text, end to end.

The demo is the LM study (``ssa experiment lm``) at a demo budget, so its sentence is the study's kind of result,
not a hope: the body-heavy ``study`` model (82 % of its parameters outside the embedding) with a 2,048-token BPE,
512 tokens of context, on the State-of-the-Union speeches (long documents, so the position term has something to
do), vanilla and SSA (shared, query + value) from the same initial weights and data order, for each seed:

1. trains both (``ssa train`` runs under DIR/runs/, resumable: rerunning the same command continues);
2. evaluates both on the same validation tokens, and at 1x, 2x and 4x the training length on whole speeches;
3. writes DIR/results.json, DIR/summary.md, DIR/lm-sotu*.png and DIR/report.html, and prints the table.

Budgets (2 CPU cores): the default trains 2 seeds x 2 models x 400k tokens (<= 10 minutes); ``--quick`` one seed
x 2 x 82k tokens (<= 2 minutes). With two seeds the 95 % interval of the paired difference is wide (Student t
with one degree of freedom): the demo says "tie" unless both seeds agree by a wide margin; ``ssa experiment lm``
has the three-seed study.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError

CLAIMS = {"wins": "SSA better", "loses": "SSA worse", "tie": "a tie"}


def verdict(results: dict[str, Any]) -> str:
    """One sentence from the paired comparison (the same rule as the study: a claim needs the interval)."""
    methods = results["methods"]
    v, s = methods["vanilla"], methods["ssa"]
    p = s.get("paired_percent")
    head = f"SSA val ppl {s['val_ppl']:.2f} vs vanilla {v['val_ppl']:.2f}"
    if not p or p["low"] is None:
        rel = (s["val_ppl"] - v["val_ppl"]) / v["val_ppl"] * 100
        return f"{head} ({rel:+.2f} %), one seed: not evidence either way"
    longest = max(s["paired_percent_by_length"], key=int)
    q = s["paired_percent_by_length"][longest]
    return (
        f"{head}: paired {p['mean']:+.2f} % [95 % CI {p['low']:+.2f}, {p['high']:+.2f}] over {p['n']} seeds: "
        f"{CLAIMS[p['verdict']]}; at {longest} tokens (4x the training length) {q['mean']:+.2f} % "
        f"[{q['low']:+.2f}, {q['high']:+.2f}]: {CLAIMS[q['verdict']]}"
    )


def run_demo(
    out: str | Path,
    quick: bool = False,
    seeds: int | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the demo budget of the LM study into ``out`` and write its report; returns results.json's content."""
    from selective_attention.evaluate.probe import probe_runs
    from selective_attention.experiments.registry import run_experiment
    from selective_attention.report.builder import build_report
    from selective_attention.utils.io import atomic_write_json

    out = Path(out)
    t0 = time.time()
    budget = "demo-quick" if quick else "demo"
    results = run_experiment("lm", out, seeds=seeds, seed=seed, progress=progress, budget=budget, **overrides)
    if "vanilla" not in results["methods"] or "ssa" not in results["methods"]:
        raise UserError("the demo needs finished vanilla and ssa runs; rerun the same command to continue")
    results["verdict"] = verdict(results)
    results["elapsed_s"] = time.time() - t0
    runs = [Path(r["dir"]) for r in results["runs"]]
    probe_runs(runs)
    corpus = results["config"]["corpora"][0]
    from selective_attention.experiments.lm import label

    figures = [f for f in (f"lm-{label(corpus)}.png", f"lm-{label(corpus)}-paired.png") if (out / f).is_file()]
    summary_md = (out / "summary.md").read_text(encoding="utf-8")
    extra_html = (
        f"<h2>Result</h2><p><b>{html.escape(results['verdict'])}</b></p>"
        + "".join(f'<p><img src="{f}" alt="{f}" style="max-width:100%"></p>' for f in figures)
        + f"<pre>{html.escape(summary_md)}</pre>"
    )
    build_report(
        runs,
        out,
        labels=[f"{r['method']}" for r in results["runs"]],
        title=f"ssa demo: SSA vs vanilla ({results['config']['size']}, {corpus}, "
        f"{results['config']['max_tokens']:,} tokens per run, seeds {results['seeds']})",
        extra_html=extra_html,
        extra_md="## Result\n\n" + results["verdict"] + "\n\n" + summary_md,
    )
    atomic_write_json(out / "results.json", results)
    return results
