"""``ssa demo`` end to end on a small corpus (fast), the full --quick run and a headless screenshot (slow)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selective_attention.demo import DemoConfig, run_demo, verdict
from selective_attention.report.builder import broken_images, is_png

ROOT = Path(__file__).resolve().parents[1]


def check_report_images(report: Path) -> list[str]:
    """Every <img> of the report: a relative path to an existing, valid PNG. Returns the sources."""
    srcs, bad = broken_images(report)
    assert srcs, "the report has no figures"
    assert bad == [], f"missing, absolute or invalid images: {bad}"
    return srcs


@pytest.fixture
def small_corpus(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from selective_attention.data.corpora import load_documents

    docs = load_documents("wiki", "train")[:120]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_demo_small_run_writes_results_and_a_complete_report(small_corpus, tmp_path):
    cfg = DemoConfig(data=str(small_corpus), max_tokens=2048, seq_len=32, batch_size=8, eval_every=4,
                     eval_tokens=256, final_eval_tokens=512, vocab_size=320)
    out = tmp_path / "demo"
    res = run_demo(cfg, out, progress=False)
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"].keys() == {"vanilla", "ssa"}
    v, s = saved["methods"]["vanilla"], saved["methods"]["ssa"]
    for d in (v, s):
        assert d["val_ppl"] > 1 and d["tokens_per_s"] > 0 and d["tokens"] >= 2048
    # same base size; SSA adds a few parameters (the shared read-outs and per-head alphas)
    assert v["new_parameters"] == 0 and 0 < s["new_parameters"] < 0.01 * s["parameters"]
    assert s["parameters"] - s["new_parameters"] == v["parameters"]
    assert saved["verdict"] == res["verdict"] == verdict(saved["methods"])
    srcs = check_report_images(out / "report.html")
    assert {"figures/val_ppl.png", "figures/dilution.png", "figures/temperatures_ssa.png"} <= set(srcs)
    assert "not reached" in (out / "report.md").read_text() or s["speedup"] is not None


def test_verdict_wording():
    m = {"vanilla": {"val_ppl": 100.0}, "ssa": {"val_ppl": 99.8}}
    assert verdict(m).startswith("tie")
    m["ssa"]["val_ppl"] = 90.0
    assert "SSA better" in verdict(m)
    m["ssa"]["val_ppl"] = 110.0
    assert "SSA worse" in verdict(m)


def test_demo_rejects_a_budget_below_one_batch(tmp_path):
    from selective_attention.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--max-tokens", "10"]) == 2


@pytest.mark.slow
def test_demo_quick_cli_and_screenshot(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "selective_attention", "demo", "--quick", "--out", str(out),
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vanilla" in r.stdout and "ssa" in r.stdout
    check_report_images(out / "report.html")
    if not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no chromium for the screenshot")
    shot = tmp_path / "shot.png"
    s = subprocess.run(["bash", str(ROOT / "scripts" / "screenshot_report.sh"), str(out / "report.html"), str(shot)],
                       capture_output=True, text=True, timeout=180)
    assert s.returncode == 0, s.stderr
    assert is_png(shot) and shot.stat().st_size > 10_000
