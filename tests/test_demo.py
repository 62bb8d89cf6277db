"""``ssa demo`` end to end on a small corpus (fast), the full --quick run and a headless screenshot (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from selective_attention.demo import run_demo, verdict
from selective_attention.report.builder import broken_images, is_png

ROOT = Path(__file__).resolve().parents[1]


def check_report_images(report: Path) -> list[str]:
    """Every <img> of the report: a relative path to an existing, valid PNG. Returns the sources."""
    srcs, bad = broken_images(report)
    assert srcs, "the report has no figures"
    assert bad == [], f"missing, absolute or invalid images: {bad}"
    return srcs


@pytest.fixture
def long_corpus(tmp_path, monkeypatch) -> Path:
    """Documents of a few thousand characters (the demo evaluates windows inside one document)."""
    monkeypatch.setenv("SSA_CACHE_DIR", str(tmp_path / "cache"))
    from selective_attention.data.corpora import load_documents

    docs = load_documents("wiki", "train")[:240]
    path = tmp_path / "speeches.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(docs[i : i + 12])}) + "\n" for i in range(0, 240, 12)))
    return path


@dataclass
class Recorded:
    watchers: list  # the demo's TrainingProgress bars
    seen: list[tuple[int, str]]  # (steps, postfix) after every poll


@pytest.fixture
def recorded_progress(monkeypatch) -> Recorded:
    """The demo's bar polled on every metrics line the trainer writes instead of on its timer (deterministic),
    each poll recorded."""
    from selective_attention import demo
    from selective_attention.train import metrics_log

    rec = Recorded([], [])

    class Recording(demo.TrainingProgress):
        def __init__(self, runs, interval=None):
            super().__init__(runs, interval=3600)
            rec.watchers.append(self)

        def poll(self):
            super().poll()
            rec.seen.append((self.bar.n, self.bar.postfix))

    write = metrics_log.MetricsLog.write

    def write_and_poll(self, record):
        write(self, record)
        if rec.watchers:
            rec.watchers[-1].poll()

    monkeypatch.setattr(demo, "TrainingProgress", Recording)
    monkeypatch.setattr(metrics_log.MetricsLog, "write", write_and_poll)
    return rec


def test_demo_small_run_writes_results_a_verdict_and_a_complete_report(long_corpus, tmp_path, recorded_progress):
    out = tmp_path / "demo"
    res = run_demo(
        out,
        seeds=2,
        progress=True,
        corpora=(str(long_corpus),),
        length_corpus=str(long_corpus),
        size="tiny",
        vocab_size=320,
        seq_len=32,
        batch_size=4,
        max_tokens=1024,  # 8 steps of 4 x 32 tokens
        eval_every=4,
        eval_tokens=512,
        length_windows=2,
    )
    saved = json.loads((out / "results.json").read_text())
    # SSA in the form the configuration search chose (the official form, temperatures at 10x the base rate)
    assert saved["seeds"] == [0, 1] and list(saved["methods"]) == ["vanilla", "ssa-official"]
    v, s = saved["methods"]["vanilla"], saved["methods"]["ssa-official"]
    ssa_run = next(r for r in saved["runs"] if r["method"] == "ssa-official")
    assert json.loads((Path(ssa_run["dir"]) / "run.json").read_text())["config"]["temperature_lr"] == 10 * 2e-3
    assert v["new_parameters"] == 0 and 0 < s["new_parameters"] < 0.01 * s["parameters"]
    assert s["parameters"] - s["new_parameters"] == v["parameters"]
    assert set(s["ppl_by_length"]) == {"32", "64", "128"}
    assert saved["verdict"] == res["verdict"] == verdict(saved)
    assert "over 2 seeds" in saved["verdict"] and "at 128 tokens" in saved["verdict"]
    srcs = check_report_images(out / "report.html")
    assert {"lm-speeches.png", "figures/val_ppl.png", "figures/dilution.png"} <= set(srcs)
    assert saved["verdict"] in (out / "report.md").read_text()
    summary = (out / "summary.md").read_text()
    assert summary in (out / "report.md").read_text()  # verbatim in the Markdown report
    html = (out / "report.html").read_text()
    assert "<pre" not in html and html.count("<table") >= 2  # the summary's tables rendered, not pasted raw

    # the bar counts the steps of all runs and moves at every step the trainer logs (step 1, each validation,
    # the last), not once per run
    [w] = recorded_progress.watchers
    names = [f"speeches/{m} seed {s}" for s in (0, 1) for m in ("vanilla", "ssa-official")]  # the study's order
    assert [(r.name, r.steps) for r in w.runs] == [(n, 8) for n in names]
    assert w.bar.total == 32 and w.bar.n == 32
    seen = recorded_progress.seen
    counts = [n for n, _ in seen]
    assert counts == sorted(counts) and counts[0] == 0 and seen[-1] == (32, "tables")
    assert set(counts) == {0} | {8 * i + k for i in range(4) for k in (1, 4, 8)}
    for i, name in enumerate(names):  # while run i trains, the bar stands inside its share and names it
        assert {p for n, p in seen if 8 * i < n < 8 * (i + 1)} == {f"{name}: training"}


def test_training_progress_reads_each_runs_log(tmp_path):
    from selective_attention.demo import PlannedRun, TrainingProgress
    from selective_attention.experiments.lm import EVAL_FILE

    a, b = tmp_path / "a", tmp_path / "b"
    w = TrainingProgress([PlannedRun("c/vanilla seed 0", a, 20), PlannedRun("c/ssa seed 0", b, 20)], interval=0.01)
    assert w.bar.total == 40 and w.steps_done() == (0, "c/vanilla seed 0: training")
    a.mkdir()
    (a / "metrics.jsonl").write_text('{"step": 1}\n{"step": 10, "val_loss": 3.0}\n{"step": 1')  # a torn last line
    assert w.steps_done() == (10, "c/vanilla seed 0: training")
    with w:  # the thread polls on its own
        with (a / "metrics.jsonl").open("a") as f:
            f.write('1}\n{"step": 20}\n')
        deadline = time.monotonic() + 30
        while w.bar.n != 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert w.bar.n == 20 and w.steps_done() == (20, "c/vanilla seed 0: evaluating")
        (a / EVAL_FILE).touch()
        b.mkdir()
        (b / "metrics.jsonl").write_text('{"step": 5}\n')
    assert w.bar.n == 25 and w.bar.postfix == "c/ssa seed 0: training"  # the last poll, at the end
    assert not w._thread.is_alive()


def _results(ssa_diffs: list[float], long_diffs: list[float]) -> dict:
    from selective_attention.utils.stats import paired

    return {
        "methods": {
            "vanilla": {"val_ppl": 100.0, "seeds": [0, 1]},
            "ssa": {
                "val_ppl": 99.0,
                "seeds": [0, 1],
                "paired_percent": paired(ssa_diffs),
                "paired_percent_by_length": {"512": paired(ssa_diffs), "2048": paired(long_diffs)},
            },
        }
    }


def test_verdict_claims_only_what_the_interval_allows():
    assert "a tie" in verdict(_results([-1.0, -3.0], [-1.0, -3.0]))  # t(1) = 12.7: a wide interval
    won = verdict(_results([-2.0, -2.02], [1.0, 1.01]))
    assert ": SSA better;" in won and won.endswith("SSA worse") and "at 2048 tokens" in won
    one = {
        "methods": {
            "vanilla": {"val_ppl": 100.0, "seeds": [0]},
            "ssa": {"val_ppl": 90.0, "seeds": [0], "paired_percent": {"mean": -10.0, "low": None}},
        }
    }
    assert verdict(one).endswith("one seed: not evidence either way")


def test_demo_rejects_a_budget_below_one_batch(tmp_path):
    from selective_attention.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--max-tokens", "10"]) == 2


@pytest.mark.slow
def test_demo_quick_cli_and_screenshot(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "selective_attention", "demo", "--quick", "--out", str(out), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vanilla" in r.stdout and "ssa-official" in r.stdout and "one seed" in r.stdout
    check_report_images(out / "report.html")
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no chromium for the screenshot")
    shot = tmp_path / "shot.png"
    s = subprocess.run(
        ["bash", str(ROOT / "scripts" / "screenshot_report.sh"), str(out / "report.html"), str(shot)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert s.returncode == 0, s.stderr
    assert is_png(shot) and shot.stat().st_size > 10_000
