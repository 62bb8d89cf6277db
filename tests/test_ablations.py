"""The ablation harness: every row is the same model but for its temperature, sees the same data, trains with the
project's one loop (train.loop.fit), and a tiny run writes the experiment's results.json. The rules' own values
are tested in test_methods.py."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from selective_attention.errors import UserError
from selective_attention.experiments import ablations as A
from selective_attention.methods import ScalableSoftmaxTemperature
from selective_attention.train import loop

VOCAB, T = 64, 16
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 4000).astype(np.uint16)  # a synthetic "corpus"


def test_rows_share_the_base_weights_and_differ_in_the_attention():
    """One harness: the same seed gives every row vanilla's weights; only what the method adds is new."""
    vanilla, applied = A.build("vanilla", "tiny", VOCAB, T, seed=0)
    assert applied.new_parameters == []
    ref = dict(vanilla.named_parameters())
    x = torch.randint(0, VOCAB, (2, T))
    with torch.no_grad():
        ref_logits = vanilla(input_ids=x).logits
    same_function = set()
    for method in A.ALL_METHODS[1:]:
        model, applied = A.build(method, "tiny", VOCAB, T, seed=0, train_tokens=TOKENS)
        new = {id(p) for p in applied.new_parameters}
        base = {n: p for n, p in model.named_parameters() if id(p) not in new}
        assert set(base) == set(ref), method
        assert all(torch.equal(p, ref[n]) for n, p in base.items()), method
        with torch.no_grad():
            if torch.equal(model(input_ids=x).logits, ref_logits):
                same_function.add(method)
    # at init only the rows without a position term are vanilla's function: the token term starts at
    # tanh(0) = 0 and const at tau = 1; c log p (c = 0.5) and the fixed rules change it from the first step
    assert same_function == {"ssa-v", "ssa-token", "const"}
    with pytest.raises(UserError, match="unknown method"):
        A.build("ssa-x", "tiny", VOCAB, T, seed=0)


def test_row_configurations():
    """Each SSA row puts its temperatures (and terms) where its name says; the rules are the registry's."""

    def ssa(method):
        model, _ = A.build(method, "tiny", VOCAB, T, seed=0)
        return model.config.ssa

    def targets(method):
        return {k for k in ("query", "key", "value") if ssa(method)[k]}

    assert targets("ssa-q") == {"query"} and targets("ssa-k") == {"key"} and targets("ssa-v") == {"value"}
    assert targets("ssa-qv") == {"query", "value"} and targets("ssa-qkv") == {"query", "key", "value"}
    assert ssa("ssa-qv-vpos")["value_position_aware"] and not ssa("ssa-qv")["value_position_aware"]
    assert not ssa("ssa-token")["position_aware"] and not ssa("ssa-pos")["token_aware"]
    assert all(ssa(m)["init"] == "scratch" for m in A.SSA_ROWS)
    model, applied = A.build("ssmax", "tiny", VOCAB, T, seed=0)
    rules = [m for m in model.modules() if isinstance(m, ScalableSoftmaxTemperature)]
    assert len(rules) == 2 and list(map(id, applied.temperature_parameters)) == [id(r.s) for r in rules]
    assert model.config.ssa_method["name"] == "ssmax"


def test_every_row_trains_with_the_shared_loop_on_the_same_windows(monkeypatch):
    calls: list[tuple[str, int, float, torch.Tensor]] = []
    real = loop.train_step

    def counting(model, optimizer, batch, *, step, lr_scale=1.0, **kw):
        seen = []

        def recording(m):
            seen.append(batch(m))
            return seen[-1]

        out = real(model, optimizer, recording, step=step, lr_scale=lr_scale, **kw)
        calls.append((method, step, lr_scale, seen[0]))
        return out

    monkeypatch.setattr(loop, "train_step", counting)
    cfg = A.Config(size="tiny", steps=3, seq_len=T, batch_size=2, eval_tokens=64, warmup=2, device="cpu")
    results = {}
    for method in ("vanilla", "ssa-qv", "freq"):
        results[method] = A.train_one(method, cfg, 0, TOKENS, TOKENS[:500], VOCAB)
    assert [(m, s) for m, s, _, _ in calls] == [(m, s) for m in results for s in range(3)]
    # the harness's schedule: warmup 1/2, 2/2, then the cosine reaches 0.1 at the last step
    assert [lr for m, _, lr, _ in calls if m == "vanilla"] == pytest.approx([0.5, 0.55, 0.1])
    for s in range(3):  # every method sees the same windows
        w = [b for _, step, _, b in calls if step == s]
        assert w[0].shape == (2, T + 1) and torch.equal(w[0], w[1]) and torch.equal(w[0], w[2])
    assert not torch.equal(calls[0][3], calls[1][3])  # ... and new ones at every step
    assert results["vanilla"]["new_parameters"] == 0 < results["ssa-qv"]["new_parameters"]
    assert results["freq"]["new_parameters"] == 0  # a fixed rule
    assert results["vanilla"]["val_loss"] != results["ssa-qv"]["val_loss"]


def test_a_row_repeats_exactly_and_depends_on_the_seed():
    cfg = A.Config(size="tiny", steps=2, seq_len=T, batch_size=2, eval_tokens=64, device="cpu")
    a = A.train_one("ssa-qv", cfg, 1, TOKENS, TOKENS[:500], VOCAB)
    b = A.train_one("ssa-qv", cfg, 1, TOKENS, TOKENS[:500], VOCAB)
    c = A.train_one("ssa-qv", cfg, 2, TOKENS, TOKENS[:500], VOCAB)
    assert a["val_loss"] == b["val_loss"] != c["val_loss"]
    with pytest.raises(UserError, match="shorter than one window"):
        A.train_one("vanilla", dataclasses.replace(cfg, seq_len=64), 0, TOKENS, TOKENS[:50], VOCAB)


def test_tiny_run_writes_results(tmp_path, monkeypatch):
    monkeypatch.setenv("SSA_CACHE_DIR", str(tmp_path / "cache"))
    from selective_attention.data.corpora import load_documents
    from selective_attention.experiments import run_experiment

    docs = load_documents("wiki", "train")[:80]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    res = run_experiment(
        "ablations",
        tmp_path / "out",
        seeds=1,
        progress=False,
        data=str(corpus),
        steps=2,
        seq_len=16,
        batch_size=2,
        eval_tokens=64,
        vocab_size=300,
        methods=("vanilla", "ssa-qv", "ssa-k", "yarn", "freq"),
    )
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["experiment"] == "ablations" and saved["seeds"] == [0]
    assert list(saved["methods"]) == ["vanilla", "ssa-qv", "ssa-k", "yarn", "freq"]
    for d in saved["methods"].values():
        assert d["val_ppl"] == pytest.approx(math.exp(d["val_loss"])) and "val_ppl_std" in d
    assert saved["methods"]["vanilla"]["new_parameters"] == 0 < saved["methods"]["ssa-qv"]["new_parameters"]
    assert res["methods"] == saved["methods"]
    assert (tmp_path / "out" / "ablations.png").is_file() and (tmp_path / "out" / "summary.md").is_file()
