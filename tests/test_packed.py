"""Packed documents (issue 21): attention and positions that restart at every document, in the fused op, the
layer, every attention method of a training run, the Hugging Face path, training (with exact resume) and
perplexity. The equality tests compare a packed batch with each document fed alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selective_attention import SelectiveSelfAttention, SSAConfig
from selective_attention.cli import main
from selective_attention.errors import UserError
from selective_attention.functional import (
    document_mask,
    document_positions,
    is_block_mask,
    reference_attention,
    selective_attention,
)
from selective_attention.methods import METHODS, apply_method
from selective_attention.train import TrainConfig, train
from selective_attention.train.data import DocumentIndex, WindowSampler
from selective_attention.train.loss import lm_loss, logits_of, model_inputs
from selective_attention.train.models import build_model

D64 = torch.float64
EOT = 0  # the document separator of the synthetic token arrays


def _segments(ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of each document of (B, T) document ids."""
    out = []
    for b, row in enumerate(ids.tolist()):
        s = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[t - 1]:
                out.append((b, s, t))
                s = t
    return out


# ---------------------------------------------------------------------------------------- the fused op


def test_document_positions_and_mask():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [4, 4, 4, 4, 7, 7]])
    assert document_positions(ids).tolist() == [[1, 2, 3, 1, 2, 1], [1, 2, 3, 4, 1, 2]]
    assert document_positions(ids[0]).tolist() == [1, 2, 3, 1, 2, 1]
    m = document_mask(ids)
    assert m.dtype == torch.bool and m.shape == (2, 1, 6, 6)  # one mask for every head, never a float mask
    brute = torch.tensor([[[i >= j and row[i] == row[j] for j in range(6)] for i in range(6)] for row in ids.tolist()])
    assert torch.equal(m[:, 0], brute)
    assert torch.equal(document_mask(ids, q_len=2), m[:, :, -2:])  # queries are the last keys (cached decoding)
    with pytest.raises(ValueError):
        document_mask(ids.float())
    with pytest.raises(ValueError):
        document_mask(ids, backend="dense")


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)])
def test_fused_op_packed_equals_each_document_alone(H, Hkv):
    g = torch.Generator().manual_seed(0)
    B, T, D = 2, 11, 8
    ids = torch.tensor([[0] * 4 + [1] * 5 + [2] * 2, [3] * 7 + [5] * 4])
    q = torch.randn(B, H, T, D, generator=g, dtype=D64, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=D64, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=D64, requires_grad=True)
    taus = [(0.5 + torch.rand(B, h, T, generator=g, dtype=D64)).requires_grad_() for h in (H, Hkv, Hkv)]
    w = torch.randn(B, H, T, D, generator=g, dtype=D64)
    out = selective_attention(q, k, v, *taus, document_ids=ids)
    (out * w).sum().backward()
    packed_grads = [t.grad.clone() for t in (q, k, v, *taus)]
    for t in (q, k, v, *taus):
        t.grad = None
    for b, s, e in _segments(ids):
        sl = (slice(b, b + 1), slice(None), slice(s, e))
        alone = selective_attention(q[sl], k[sl], v[sl], *(t[sl] for t in taus))
        torch.testing.assert_close(out[sl], alone, atol=1e-12, rtol=0)
        (alone * w[sl]).sum().backward()
    for got, t in zip(packed_grads, (q, k, v, *taus)):
        torch.testing.assert_close(got, t.grad, atol=1e-12, rtol=0)
    # the materialised reference with the same mask agrees, and a mask built once per batch is the same call
    ref = reference_attention(q, k, v, taus[0], taus[1], taus[2], attn_mask=document_mask(ids))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    once = selective_attention(q, k, v, *taus, attn_mask=document_mask(ids))
    torch.testing.assert_close(once, out, atol=0, rtol=0)


def test_fused_op_documents_with_a_caller_mask_and_cached_queries():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 8, 4, generator=g, dtype=D64)
    k, v = torch.randn(2, 1, 2, 8, 4, generator=g, dtype=D64)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    full = selective_attention(q, k, v, document_ids=ids)
    tail = selective_attention(q[:, :, 5:], k, v, document_ids=ids)  # 3 new queries over all 8 keys
    torch.testing.assert_close(tail, full[:, :, 5:], atol=1e-12, rtol=0)
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[:, 4] = False  # the caller's mask still applies
    both = selective_attention(q, k, v, attn_mask=keep, document_ids=ids)
    ref = reference_attention(q, k, v, attn_mask=keep & document_mask(ids)[0, 0])
    torch.testing.assert_close(both, ref, atol=1e-10, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_matches_the_boolean_mask():
    """The CUDA path's BlockMask, run forward on CPU (flex attention has no CPU backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    g = torch.Generator().manual_seed(2)
    ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7])
    q = torch.randn(2, 4, 16, 16, generator=g)
    k, v = torch.randn(2, 2, 2, 16, 16, generator=g)
    tau_q, tau_v = 0.5 + torch.rand(2, 4, 16, generator=g), 0.5 + torch.rand(2, 2, 16, generator=g)
    block = document_mask(ids, backend="flex")
    assert is_block_mask(block)
    with torch.no_grad():
        flex = selective_attention(q, k, v, tau_q, tau_v, attn_mask=block)
        sdpa = selective_attention(q, k, v, tau_q, tau_v, attn_mask=document_mask(ids, backend="sdpa"))
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- the layer


def _layer(seed: int = 0) -> SelectiveSelfAttention:
    torch.manual_seed(seed)
    layer = SelectiveSelfAttention(32, 4, 2, SSAConfig(init="scratch", key=True), rope=True).double()
    with torch.no_grad():
        for name, p in layer.temperature.named_parameters():
            p.copy_(torch.randn(p.shape, dtype=D64) * (0.03 if name.endswith("coefficient") else 0.5))
    return layer


def test_layer_packed_equals_each_document_alone():
    layer = _layer()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 32, generator=g, dtype=D64)
    ids = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4, [0] * 2 + [1] * 10])
    # row 0 starts inside a document that began 6 tokens earlier: its first document continues at position 7
    positions = document_positions(ids)
    positions[0, :5] += 6
    w = torch.randn(2, 12, 32, generator=g, dtype=D64)
    y = layer(x, positions=positions, document_ids=ids)
    (y * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    for b, s, e in _segments(ids):
        alone = layer(x[b : b + 1, s:e], positions=positions[b : b + 1, s:e])
        torch.testing.assert_close(y[b : b + 1, s:e], alone, atol=1e-12, rtol=0)
        (alone * w[b : b + 1, s:e]).sum().backward()
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-10, rtol=0, msg=n)
    # positions default to in-document positions; a mask built once per batch gives the same output
    torch.testing.assert_close(
        layer(x, document_ids=ids),
        layer(x, positions=document_positions(ids), attn_mask=document_mask(ids)),
        atol=0,
        rtol=0,
    )
    taus = layer.temperatures(x, document_ids=ids)["query"]
    torch.testing.assert_close(taus[:1, :, 5:8], layer.temperatures(x[:1, 5:8])["query"], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="KVCache"):
        from selective_attention.layer import KVCache

        layer(x, document_ids=ids, cache=KVCache())


# ---------------------------------------------------------------------------------------- the sampler


def _token_array(n_docs: int = 40, seed: int = 0, vocab: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(n_docs):
        parts.append(rng.integers(1, vocab, rng.integers(3, 16)))
        parts.append([EOT])
    return np.concatenate(parts).astype(np.uint16)


def test_sampler_positions_are_in_document_positions():
    tokens = _token_array()
    truth, p = np.zeros(len(tokens), dtype=np.int64), 0  # brute force: a document begins at each EOT
    for i, t in enumerate(tokens):
        p = 0 if t == EOT else (p + 1 if i else 0)
        truth[i] = p
    s = WindowSampler(tokens, seq_len=24, seed=5, boundary=EOT)
    indices = range(0, 2 * s.n_windows)  # two epochs (another phase)
    x, y, pos = s.samples(indices)
    w = s.windows(indices)
    assert torch.equal(x, w[:, :-1]) and torch.equal(y, w[:, 1:])  # the same windows as stitched
    for row, start in zip(pos, s.starts(indices)):
        assert row.tolist() == truth[start : start + 24].tolist()
    assert (pos[:, 0] > 0).any()  # some windows start inside a document
    # a pure function of (seed, sample index): another sampler, or one index at a time, gives the same
    other = WindowSampler(tokens, 24, 5, boundary=EOT)
    assert all(torch.equal(a, b) for a, b in zip(other.samples(range(7, 9)), (x[7:9], y[7:9], pos[7:9])))
    # stitched: what it always was
    stitched = WindowSampler(tokens, 24, 5)
    assert torch.equal(stitched.samples(indices), w) and stitched.documents is None
    assert DocumentIndex(tokens, EOT).longest() == int(np.diff(np.flatnonzero(tokens == EOT)).max())


# ---------------------------------------------------------------------------------------- every method

VOCAB = 300
RULE_METHODS = list(METHODS)  # vanilla, ssa, ssa-pos-head, ssa-official, const, yarn, ssmax, freq, llama4, gated


def _method_model(name: str, tokens: np.ndarray):
    model = build_model("tiny", VOCAB, 24, "vanilla", None, seed=0)
    options = {"floor_scale": 2} if name == "llama4" else {}  # tau then steps within a few tokens
    applied = apply_method(
        model,
        name,
        ssa=SSAConfig(init="scratch", key=True),
        seq_len=24,
        options=options,
        train_tokens=tokens,
        vocab=VOCAB,
    )
    from selective_attention.temperature import temperature_parameters

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # temperatures that are not the identity, with a position term that matters
        named = {id(p): n for n, p in model.named_parameters()}
        for p in {id(p): p for p in [*applied.new_parameters, *temperature_parameters(model)]}.values():
            n = named[id(p)]
            noise = torch.randn(p.shape, generator=g)
            if n.endswith("coefficient"):
                p.copy_(0.03 + 0.01 * noise)  # c = 10 theta ~ 0.3
            elif n.endswith("beta"):
                p.fill_(0.0)  # ssa-official: c = exp(-1)
            elif n.endswith(".s"):
                p.copy_(0.5 + 0.1 * noise)
            elif n.endswith(".tau"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.5 * noise)
    return model.train()


@pytest.fixture(scope="module")
def packed_batch():
    tokens = _token_array(seed=1)
    s = WindowSampler(tokens, 24, seed=0, boundary=EOT)
    for g in range(s.n_windows - 1):  # two windows: one starting inside a document, each holding several
        x, y, pos = s.samples(range(g, g + 2))
        if pos[0, 0] > 0 and int((pos == 0).sum()) >= 4:
            return tokens, x, y, pos
    raise AssertionError("no suitable windows")


@pytest.mark.parametrize("name", RULE_METHODS)
def test_packed_batch_equals_each_document_alone(name, packed_batch):
    """Logits, loss and gradients of every document in a packed batch equal those it gets alone (1e-5)."""
    tokens, x, y, pos = packed_batch
    model = _method_model(name, tokens)
    logits = logits_of(model(**model_inputs(x, pos)))  # (B, T, V)
    loss = lm_loss(logits, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    n_tokens, total = y.numel(), 0.0
    doc = (pos == 0).long().cumsum(-1)  # a new document at every position 0
    for b, s, e in _segments(doc):
        seg_logits = logits_of(model(**model_inputs(x[b : b + 1, s:e], pos[b : b + 1, s:e])))
        torch.testing.assert_close(logits[b : b + 1, s:e], seg_logits, atol=1e-5, rtol=0)
        seg = torch.nn.functional.cross_entropy(seg_logits[0].float(), y[b, s:e], reduction="sum") / n_tokens
        seg.backward()
        total += float(seg.detach())
    assert float(loss) == pytest.approx(total, abs=1e-5)
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    if name in ("ssa", "ssmax", "llama4"):  # the comparison can fail: stitched, the documents see each other
        with torch.no_grad():
            stitched = logits_of(model(input_ids=x))
        assert not torch.allclose(stitched, logits.detach(), atol=1e-3)


# ---------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_flattening_collator_gives_each_example_what_it_gets_alone(tiny, family, impl, randomise_temperatures):
    from transformers import DataCollatorWithFlattening

    from selective_attention.hf import convert, ssa_state
    from selective_attention.hf.state import converted_attention_modules

    model = convert(tiny(family), SSAConfig(init="scratch"), backend=impl)
    assert model.config._attn_implementation == {"sdpa": "ssa", "eager": "ssa_eager"}[impl]
    randomise_temperatures(model)
    g = torch.Generator().manual_seed(4)
    examples = [torch.randint(1, 97, (n,), generator=g) for n in (5, 7, 3)]
    batch = DataCollatorWithFlattening()([{"input_ids": e.tolist()} for e in examples])
    assert batch["position_ids"].tolist() == [[*range(5), *range(7), *range(3)]]
    attn = converted_attention_modules(model)[0]
    st = ssa_state(attn)
    with torch.no_grad():
        st.record = []
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        tau_packed = st.record[-1]["query"]
        alone, tau_alone = [], []
        for e in examples:
            st.record = []
            alone.append(model(input_ids=e[None]).logits)
            tau_alone.append(st.record[-1]["query"])
        st.record = None
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(tau_packed.expand(1, -1, -1), torch.cat(tau_alone, dim=-1), atol=1e-6, rtol=0)
    # where transformers would mix the documents (a cache, or a 2-D attention mask): refused in one line
    for kwargs in ({}, {"attention_mask": torch.ones_like(batch["input_ids"]), "use_cache": False}):
        with pytest.raises(UserError, match="position_ids restart at token 5") as e, torch.no_grad():
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kwargs)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- training


def test_train_packed_documents_resumes_bit_exact(metrics, weights, cfg, tmp_path):
    cfg.attention, cfg.packing, cfg.max_tokens = "ssa", "documents", 5 * 128
    full = TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "full")})
    result = train(full)
    assert result["config"]["packing"] == "documents"
    assert train(TrainConfig(**{**cfg.to_dict(), "stop_at_step": 3})) == {"stopped_at_step": 3, "total_steps": 5}
    train(cfg)  # the same settings: resumes from step 3
    a, b = weights(full.out), weights(cfg.out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")} for m in metrics(full.out)]
    assert [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")} for m in metrics(cfg.out)] == strip
    # the same run stitched (the default) trains on the same windows to other weights; resuming across is refused
    stitched = train(TrainConfig(**{**cfg.to_dict(), "packing": "stitched", "out": str(tmp_path / "stitched")}))
    assert stitched["final_val_loss"] != result["final_val_loss"]
    with pytest.raises(UserError, match="packing"):
        train(TrainConfig(**{**cfg.to_dict(), "packing": "stitched", "out": full.out}))


def test_cli_packing_flag(cli_args, cfg, capsys):
    assert main(cli_args(cfg, "--packing", "documents", "--attention", "llama4")) == 0
    run = json.loads((Path(cfg.out) / "run.json").read_text())
    assert run["config"]["packing"] == "documents"
    assert main(cli_args(cfg, "--packing", "docs", "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "--packing must be stitched or documents" in err and err.strip().count("\n") == 0


# ---------------------------------------------------------------------------------------- evaluation


def test_document_perplexity_scores_each_document_alone(tiny_llama_257, byte_tokenizer):
    from selective_attention.evaluate.perplexity import document_perplexity, perplexity

    model = tiny_llama_257()
    docs = ["The cat sat on the mat.", "A dog ran far away, home again.", "Red, blue."]
    res = document_perplexity(model, byte_tokenizer, docs, seq_len=64, batch_size=2)
    alone = [perplexity(model, byte_tokenizer, [d], seq_len=64) for d in docs]
    assert res["tokens"] == sum(r["tokens"] for r in alone) and res["context"] == "document"
    assert res["loss"] * res["tokens"] == pytest.approx(sum(r["loss"] * r["tokens"] for r in alone), rel=1e-5)
    stitched = perplexity(model, byte_tokenizer, docs, seq_len=64)
    assert stitched["tokens"] == res["tokens"] and stitched["loss"] != pytest.approx(res["loss"], rel=1e-6)
    # a document longer than the window: windows inside it, at its true positions, every token once
    long = document_perplexity(model, byte_tokenizer, [" ".join(docs * 3)], seq_len=16, batch_size=3)
    assert long["tokens"] == perplexity(model, byte_tokenizer, [" ".join(docs * 3)], seq_len=16)["tokens"]


def test_eval_cli_packing_documents(tiny_llama_257, byte_tokenizer, corpus, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_llama_257().save_pretrained(model_dir)
    byte_tokenizer.save_pretrained(model_dir)
    out = {}
    for packing in ("stitched", "documents"):
        path = tmp_path / f"{packing}.json"
        assert (
            main(
                [
                    "eval",
                    "--model",
                    str(model_dir),
                    "--data",
                    str(corpus),
                    "--tasks",
                    "perplexity",
                    "--limit",
                    "3",
                    "--seq-len",
                    "32",
                    "--packing",
                    packing,
                    "--no-progress",
                    "--out",
                    str(path),
                ]
            )
            == 0
        )
        out[packing] = json.loads(path.read_text())["perplexity"]
    assert out["documents"]["packing"] == "documents" and out["documents"]["context"] == "document"
    assert out["documents"]["tokens"] == out["stitched"]["tokens"]


# ---------------------------------------------------------------------------------------- benchmark


def test_bench_has_the_packed_documents_rows():
    from selective_attention.bench.attention import AttentionBenchConfig, run_attention_bench

    res = run_attention_bench(
        AttentionBenchConfig(
            seq_lens=[32],
            batch=1,
            heads=2,
            head_dim=8,
            dtypes=["float32"],
            repeats=1,
            warmup=0,
            doc_len=8,
            naive_max_len=0,
        )
    )
    row = res["rows"][0]
    for m in ("sdpa_docs", "ssa_docs"):
        assert row[f"{m}_ms"] > 0 and row[f"{m}_time_ratio"] > 0 and "naive_ms" not in row


# ---------------------------------------------------------------------------------------- compiled


@pytest.mark.slow
def test_compiled_layer_with_documents_equals_eager():
    layer = _layer().float()
    x = torch.randn(2, 12, 32)
    ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
    mask, positions = document_mask(ids), document_positions(ids)
    compiled = torch.compile(layer, fullgraph=True)
    eager = layer(x, positions=positions, attn_mask=mask)
    got = compiled(x, positions=positions, attn_mask=mask)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    got.sum().backward()
