"""``ssa demo`` (``cli.demo``): SSA against vanilla attention on real text, end to end.

The demo is the LM study (``ssa experiment lm``) at a demo budget, so its sentence is the study's kind of result,
not a hope: the body-heavy ``study`` model (82 % of its parameters outside the embedding) with a 2,048-token BPE,
512 tokens of context, on the State-of-the-Union speeches (long documents, so the position term has something to
do), vanilla and SSA in the form that cost least in the configuration search (``lm.DEMO_SSA``: the official form,
temperatures at 10x) from the same initial weights and data order, for each seed:

1. trains both (``ssa train`` runs under DIR/runs/, resumable: rerunning the same command continues);
2. evaluates both on the same validation tokens, and at 1x, 2x and 4x the training length on whole speeches;
3. writes DIR/results.json, DIR/summary.md, DIR/lm-sotu*.png and DIR/report.html, and prints the table.

Budgets (2 CPU cores): the default trains 2 seeds x 2 models x 400k tokens (<= 10 minutes); ``--quick`` one seed
x 2 x 82k tokens (<= 2 minutes). With two seeds the 95 % interval of the paired difference is wide (Student t
with one degree of freedom): the demo says "tie" unless both seeds agree by a wide margin; ``ssa experiment lm``
has the three-seed study.
"""

from __future__ import annotations

import dataclasses
import html
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from selective_attention.errors import UserError

CLAIMS = {"wins": "SSA better", "loses": "SSA worse", "tie": "a tie"}
POLL_S = 1.0  # how often the progress bar reads the runs' metrics logs


def verdict(results: dict[str, Any]) -> str:
    """One sentence from the paired comparison (the same rule as the study: a claim needs the interval)."""
    methods = results["methods"]
    row = ssa_row(results)
    v, s = methods["vanilla"], methods[row]
    p = s.get("paired_percent")
    head = f"SSA ({row}) val ppl {s['val_ppl']:.2f} vs vanilla {v['val_ppl']:.2f}"
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


def ssa_row(results: dict[str, Any]) -> str:
    """The demo's SSA row: its one row besides vanilla."""
    rows = [m for m in results["methods"] if m != "vanilla"]
    if "vanilla" not in results["methods"] or len(rows) != 1:
        raise UserError("the demo needs finished vanilla and SSA runs; rerun the same command to continue")
    return rows[0]


@dataclass(frozen=True)
class PlannedRun:
    name: str  # "sotu/vanilla seed 0"
    path: Path  # its ``ssa train`` run directory
    steps: int  # its optimizer steps


def planned_runs(out: Path, budget: str, seeds: list[int], **overrides: Any) -> list[PlannedRun]:
    """The LM study's runs at this budget, in the order it trains them, with their optimizer steps (the Config
    ``experiments.registry.run_experiment`` builds from the same budget and overrides)."""
    from selective_attention.experiments import lm
    from selective_attention.experiments.registry import budget_overrides

    try:
        config = dataclasses.replace(lm.Config(), **{**budget_overrides(lm, budget), **overrides})
    except TypeError as e:
        raise UserError(f"lm: {e}") from None
    return [
        PlannedRun(
            f"{lm.label(r.corpus)}/{r.method} seed {r.seed}", r.path, lm.train_config(r, config, False).total_steps()
        )
        for r in lm.plan(out, config, seeds)
    ]


class TrainingProgress:
    """A bar over the optimizer steps of all the demo's runs (total: the sum of their steps) that moves while a run
    trains: a thread reads each run's metrics.jsonl every ``interval`` s (the trainer logs step 1, every
    ``log_every`` = 10 steps and each validation; a resumed run's log holds its steps so far). The study's own
    bar counts finished runs only, and its runs train without bars of their own."""

    def __init__(self, runs: list[PlannedRun], interval: float | None = None) -> None:
        from tqdm.auto import tqdm

        self.runs, self.interval = runs, POLL_S if interval is None else interval
        self.bar = tqdm(total=sum(r.steps for r in runs), desc="ssa demo", unit="step", dynamic_ncols=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ssa-demo-progress", daemon=True)

    def steps_done(self) -> tuple[int, str]:
        """Steps trained over all runs, and what the study is doing now (the first run not yet evaluated)."""
        from selective_attention.experiments.lm import EVAL_FILE
        from selective_attention.train.metrics_log import read_metrics

        done, now = 0, "tables"
        for r in self.runs:
            step = min(r.steps, max((m["step"] for m in read_metrics(r.path / "metrics.jsonl")), default=0))
            done += step
            if now == "tables" and not (r.path / EVAL_FILE).is_file():
                now = f"{r.name}: {'training' if step < r.steps else 'evaluating'}"
        return done, now

    def poll(self) -> None:
        try:
            done, now = self.steps_done()
        except (OSError, UserError):  # a log caught mid-replacement (a resumed run truncates it): read it next time
            return
        self.bar.n = done
        self.bar.set_postfix_str(now, refresh=False)
        self.bar.refresh()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def __enter__(self) -> TrainingProgress:
        self.poll()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.close()


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
    from selective_attention.experiments.lm import BUDGET_SEEDS
    from selective_attention.experiments.registry import run_experiment
    from selective_attention.report.builder import build_report
    from selective_attention.utils.io import atomic_write_json

    out = Path(out)
    t0 = time.time()
    budget = "demo-quick" if quick else "demo"
    seed_list = list(range(seed, seed + (BUDGET_SEEDS[budget] if seeds is None else seeds)))
    # one bar over every run's steps instead of the study's bar over finished runs
    watch = TrainingProgress(planned_runs(out, budget, seed_list, **overrides)) if progress else nullcontext()
    with watch:
        results = run_experiment("lm", out, seeds=seed_list, progress=False, budget=budget, **overrides)
    row = ssa_row(results)
    results["verdict"] = verdict(results)
    results["elapsed_s"] = time.time() - t0
    runs: list[str | os.PathLike[Any]] = [Path(r["dir"]) for r in results["runs"]]
    probe_runs(runs)
    corpus = results["config"]["corpora"][0]
    from selective_attention.experiments.lm import label

    figures = [f for f in (f"lm-{label(corpus)}.png", f"lm-{label(corpus)}-paired.png") if (out / f).is_file()]
    summary_md = (out / "summary.md").read_text(encoding="utf-8")
    extra_html = f"<h2>Result</h2><p><b>{html.escape(results['verdict'])}</b></p>" + "".join(
        f'<p><img src="{f}" alt="{f}" style="max-width:100%"></p>' for f in figures
    )
    build_report(
        runs,
        out,
        labels=[f"{r['method']}" for r in results["runs"]],
        title=f"ssa demo: SSA ({row}) vs vanilla ({results['config']['size']}, {corpus}, "
        f"{results['config']['max_tokens']:,} tokens per run, seeds {results['seeds']})",
        extra_html=extra_html,
        extra_md="## Result\n\n" + results["verdict"],
        markdown_section=summary_md,  # verbatim in report.md, rendered as HTML (real tables) in report.html
    )
    atomic_write_json(out / "results.json", results)
    return results
