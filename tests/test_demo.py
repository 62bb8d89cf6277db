"""``ssa demo`` end to end on a small corpus (fast), the full --quick run and a headless screenshot (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


def test_demo_small_run_writes_results_a_verdict_and_a_complete_report(long_corpus, tmp_path):
    out = tmp_path / "demo"
    res = run_demo(
        out,
        seeds=2,
        progress=False,
        corpora=(str(long_corpus),),
        length_corpus=str(long_corpus),
        size="tiny",
        vocab_size=320,
        seq_len=32,
        batch_size=4,
        max_tokens=1024,
        eval_every=4,
        eval_tokens=512,
        length_windows=2,
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and list(saved["methods"]) == ["vanilla", "ssa"]
    v, s = saved["methods"]["vanilla"], saved["methods"]["ssa"]
    assert v["new_parameters"] == 0 and 0 < s["new_parameters"] < 0.01 * s["parameters"]
    assert s["parameters"] - s["new_parameters"] == v["parameters"]
    assert set(s["ppl_by_length"]) == {"32", "64", "128"}
    assert saved["verdict"] == res["verdict"] == verdict(saved)
    assert "over 2 seeds" in saved["verdict"] and "at 128 tokens" in saved["verdict"]
    srcs = check_report_images(out / "report.html")
    assert {"lm-speeches.png", "figures/val_ppl.png", "figures/dilution.png"} <= set(srcs)
    assert saved["verdict"] in (out / "report.md").read_text()


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
    assert "vanilla" in r.stdout and "ssa" in r.stdout and "one seed" in r.stdout
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
