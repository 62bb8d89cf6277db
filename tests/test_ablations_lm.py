"""``ssa experiment lm`` plumbing at toy scale (pre-training part; fine-tuning the 135M model is a slow test)."""

from __future__ import annotations

import json

import pytest

from selective_attention.errors import UserError
from selective_attention.experiments.cli import run_experiment
from selective_attention.report.builder import broken_images


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from selective_attention.data.corpora import load_documents

    docs = load_documents("wiki", "train")[:80]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_lm_pretrain_tiny(corpus, tmp_path):
    out = tmp_path / "lm"
    res = run_experiment("lm", out, seeds=2, progress=False, data=str(corpus), pretrain_size="tiny",
                         pretrain_tokens=512, seq_len=32, batch_size=4, eval_every=2, eval_tokens=128,
                         vocab_size=300, finetune=False)
    saved = json.loads((out / "results.json").read_text())
    assert saved["experiment"] == "lm" and saved["seeds"] == [0, 1]
    assert set(saved["methods"]) == {"pretrain/vanilla", "pretrain/ssa-shared", "pretrain/ssa-mlp"}
    mlp, shared = saved["methods"]["pretrain/ssa-mlp"], saved["methods"]["pretrain/ssa-shared"]
    assert mlp["overhead_percent"] > shared["overhead_percent"] > 0 == saved["methods"]["pretrain/vanilla"][
        "overhead_percent"]
    assert shared["val_ppl_std"] >= 0 and res["methods"] == saved["methods"]
    assert broken_images(out / "pretrain" / "report" / "report.html")[1] == []


def test_lm_rejects_unknown_methods(tmp_path):
    with pytest.raises(UserError):
        run_experiment("lm", tmp_path, seeds=1, pretrain_methods=("nope",))
    with pytest.raises(UserError):
        run_experiment("lm", tmp_path, seeds=1, pretrain=False, finetune=False)
