"""evaluate/probe: the SDPA capture, dilution curves and temperatures of a saved run, probe.json and its reuse,
and `ssa report` probing before it renders."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from selective_attention.cli import main
from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.evaluate import probe as P

TEXT = "The committee met in the old library. After a long debate the chair proposed a compromise."


@pytest.mark.parametrize("gqa", [False, True])
def test_capture_attention_rebuilds_sdpa_probabilities(gqa):
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 7, 8
    q = torch.randn(B, H, T, D)
    k = torch.randn(B, 2 if gqa else H, T, D)
    v = torch.randn_like(k)
    rows: list[torch.Tensor] = []
    real = torch.nn.functional.scaled_dot_product_attention
    with P.capture_attention(rows):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    assert torch.nn.functional.scaled_dot_product_attention is real and len(rows) == 1
    w = rows[0]
    vv = v.repeat_interleave(H // v.shape[1], dim=1)
    torch.testing.assert_close(w @ vv, out, atol=1e-5, rtol=1e-5)
    assert torch.triu(w[0, 0], diagonal=1).abs().max() == 0
    mask = torch.zeros(T, T)  # a float mask is added to the logits
    mask[:, 0] = -1e9
    w2 = P._probabilities(q, k, mask, True, None)
    assert w2[..., 1:, 0].abs().max() < 1e-6


def make_run(root: Path, attention: str, vocab_docs: list[str] | None = None) -> Path:
    """A run directory as the trainer leaves it: run.json and a tiny final/ model (random, SSA from scratch
    with random token read-outs so that temperatures differ per token)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from selective_attention.data.tokenizers import build_tokenizer
    from selective_attention.temperature import temperature_modules
    from selective_attention.train.models import build_model

    tok = build_tokenizer(
        "bpe", documents=vocab_docs or [TEXT * 3, "The quick brown fox jumps over the dog. " * 4], vocab_size=300
    )
    m = build_model("tiny", len(tok), 64, attention, SSAConfig(init="scratch"), seed=0)
    with torch.no_grad():
        for fn in temperature_modules(m):
            if hasattr(fn, "readout"):
                fn.readout.normal_(std=2.0)
    run = root / attention
    m.save_pretrained(run / "final")
    tok.save_pretrained(run / "final")
    (run / "run.json").write_text(
        json.dumps(
            {
                "attention": attention,
                "seed": 0,
                "config": {"attention": attention, "seed": 0, "seq_len": 16, "data": "wiki"},
            }
        )
    )
    metrics = [{"step": i, "tokens": 100 * i, "val_ppl": 50.0 - i, "val_loss": math.log(50.0 - i)} for i in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in metrics))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_runs")
    return {a: make_run(root, a) for a in ("vanilla", "ssa")}


def test_probe_run_measures_the_saved_model(runs):
    from transformers import AutoTokenizer

    from selective_attention.hf import from_pretrained, model_temperatures

    pr = P.probe_run(runs["ssa"], text=TEXT)
    assert json.loads((runs["ssa"] / "probe.json").read_text()) == pr
    model = from_pretrained(str(runs["ssa"] / "final")).eval()
    tok = AutoTokenizer.from_pretrained(str(runs["ssa"] / "final"))
    ids = P.validation_batch(tok, "wiki", 4, 16, TEXT)  # seq_len min(128, run's 16)
    assert ids.shape == (4, 16)
    assert pr["dilution"] == P.dilution_curves(model, ids)
    assert pr["dilution"]["position"] == list(range(1, 17))
    # temperatures: mean over heads per layer, then over layers, exactly the model's own
    tids = tok(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    taus = model_temperatures(model, tids)
    per_layer = taus["query"][:, 0].mean(1)  # (L, T)
    assert torch.equal(torch.tensor(pr["temperatures"]["query"]["per_layer"]), per_layer)
    assert torch.equal(torch.tensor(pr["temperatures"]["query"]["mean"]), per_layer.mean(0))
    assert max(pr["temperatures"]["query"]["mean"]) - min(pr["temperatures"]["query"]["mean"]) > 0.05
    assert pr["tokens"] == [tok.decode([int(t)]) for t in tids[0]] and pr["n_layers"] == per_layer.shape[0]
    assert pr["notes"] == []


def test_probe_run_reuses_probe_json_until_the_model_or_text_changes(runs, monkeypatch):
    first = P.probe_run(runs["vanilla"])
    assert first["temperatures"] is None and first["tokens"] is None and first["dilution"] is not None

    def boom(*a, **k):
        raise AssertionError("probed again")

    import selective_attention.hf as hf

    monkeypatch.setattr(hf, "from_pretrained", boom)
    assert P.probe_run(runs["vanilla"]) == first  # same settings, same model files: no model loaded
    # other settings load the model again (here: the failure becomes the probe's note)
    assert "(AssertionError: probed again)" in P.probe_run(runs["vanilla"], text="another text")["notes"][0]
    monkeypatch.undo()
    assert P.probe_run(runs["vanilla"]) == first
    monkeypatch.setattr(hf, "from_pretrained", boom)
    cfg = runs["vanilla"] / "final" / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a retrained model
    assert "(AssertionError: probed again)" in P.probe_run(runs["vanilla"])["notes"][0]


def test_probe_run_notes_a_model_that_does_not_load(tmp_path):
    run = tmp_path / "broken"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{not json")
    pr = P.probe_run(run)
    assert len(pr["notes"]) == 1 and pr["notes"][0].startswith(f"could not load {run / 'final'} (")
    assert pr["dilution"] is None and pr["temperatures"] is None
    with pytest.raises(UserError, match="no final/"):
        P.probe_run(tmp_path)


def test_ssa_report_probes_then_renders(runs, tmp_path, capsys):
    for r in runs.values():
        (r / "probe.json").unlink(missing_ok=True)
    out = tmp_path / "rep"
    assert main(["report", str(runs["vanilla"]), str(runs["ssa"]), "--out", str(out), "--text", TEXT]) == 0
    assert all((r / "probe.json").is_file() for r in runs.values())
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["dilution"]) == {"vanilla", "ssa"} and set(rep["temperatures"]) == {"ssa"}
    probe = json.loads((runs["ssa"] / "probe.json").read_text())
    assert rep["temperatures"]["ssa"]["values"] == probe["temperatures"]["query"]["mean"]
    assert rep["dilution"]["vanilla"] == json.loads((runs["vanilla"] / "probe.json").read_text())["dilution"]
    assert (out / "figures" / "dilution.png").is_file() and (out / "figures" / "temperatures_ssa.png").is_file()
    assert rep["notes"] == []
    # --no-probe loads no model and draws no probe figure
    (runs["ssa"] / "probe.json").unlink()
    assert main(["report", str(runs["ssa"]), "--out", str(tmp_path / "r2"), "--no-probe"]) == 0
    assert not (runs["ssa"] / "probe.json").exists()
    assert "note: model probes skipped" in capsys.readouterr().out


def close(a: list, b: list) -> None:
    torch.testing.assert_close(
        torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=1e-6, rtol=0
    )


def _tiny_ssa(config: SSAConfig):
    from selective_attention.data.tokenizers import build_tokenizer
    from selective_attention.temperature import temperature_modules
    from selective_attention.train.models import build_model

    tok = build_tokenizer("bpe", documents=[TEXT * 3, "The quick brown fox jumps over the dog. " * 4], vocab_size=300)
    m = build_model("tiny", len(tok), 64, "ssa", config, seed=0)
    with torch.no_grad():
        for fn in temperature_modules(m):
            if hasattr(fn, "readout"):
                fn.readout.normal_(std=2.0)
    return m.eval(), tok


def test_token_temperatures_record_the_position_and_token_terms_apart():
    """tau = (1 + c log p) + tanh f(x): the probe keeps both terms, so the report can show the words' part."""
    import math as m_

    from selective_attention.hf import ssa_temperatures
    from selective_attention.hf.state import converted_attention_modules

    model, tok = _tiny_ssa(SSAConfig(init="scratch"))
    out = P.token_temperatures(model, tok, TEXT)
    q = out["temperatures"]["query"]
    T = len(out["tokens"])
    for key in ("mean", "per_layer"):
        total = torch.tensor(q[key])
        torch.testing.assert_close(torch.tensor(q["position"][key]) + torch.tensor(q["token"][key]), total)
    cs = [ssa_temperatures(a).fns["query"].position_coefficient() for a in converted_attention_modules(model)]
    expect = [
        [float(sum(1 + c * m_.log(p) for c in layer.tolist()) / len(layer)) for p in range(1, T + 1)] for layer in cs
    ]
    close(q["position"]["per_layer"], expect)
    assert all(b > a for a, b in zip(q["position"]["mean"], q["position"]["mean"][1:]))  # c = 0.5 > 0: rising
    tokens_term = q["token"]["mean"]
    assert max(tokens_term) - min(tokens_term) > 0.05 and all(-1 < x < 1 for x in tokens_term)
    v = out["temperatures"]["value"]  # no position term on the value by default: tau_v = 1 + tanh f(x)
    assert v["position"]["mean"] == [1.0] * T
    torch.testing.assert_close(torch.tensor(v["token"]["mean"]) + 1, torch.tensor(v["mean"]))


def test_position_only_and_token_only_temperatures_split_exactly():
    pos_only, tok = _tiny_ssa(SSAConfig(init="scratch", token_aware=False, value_position_aware=True))
    q = P.token_temperatures(pos_only, tok, TEXT)["temperatures"]["query"]
    assert max(abs(x) for x in q["token"]["mean"]) < 1e-6
    close(q["position"]["per_layer"], q["per_layer"])
    tok_only, tok = _tiny_ssa(SSAConfig(init="scratch", position_aware=False))
    q = P.token_temperatures(tok_only, tok, TEXT)["temperatures"]["query"]
    assert q["position"]["mean"] == [1.0] * len(q["mean"])
    assert q["token"]["mean"] == pytest.approx([t - 1 for t in q["mean"]], abs=1e-6)


def test_a_format_1_probe_json_is_probed_again(runs):
    first = P.probe_run(runs["ssa"], text=TEXT)
    assert first["format"] == 2 and "token" in first["temperatures"]["query"]
    old = json.loads(json.dumps(first))
    old["format"] = 1
    del old["temperatures"]["query"]["token"], old["temperatures"]["query"]["position"]
    (runs["ssa"] / "probe.json").write_text(json.dumps(old))
    assert P.read_probe(runs["ssa"]) is None  # same settings, but the old format: not reused
    assert P.probe_run(runs["ssa"], text=TEXT) == first
