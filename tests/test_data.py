"""Corpora, the document-level split, tokenizers and the memory-mapped token cache (issue 4, points 1-2)."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from selective_attention.data import corpora, tokens
from selective_attention.data.corpora import load_documents, resolve_source, split_documents
from selective_attention.data.tokenizers import build_tokenizer, fingerprint
from selective_attention.errors import UserError

WORDS = "the cat dog sat on mat ran far away home red blue big small tree house river stone light dark".split()


def write_corpus(path, n_docs: int = 60, seed: int = 0):
    rng = random.Random(seed)
    docs = [
        " ".join(
            " ".join(rng.choices(WORDS, k=rng.randint(5, 12))).capitalize() + "." for _ in range(rng.randint(2, 5))
        )
        for _ in range(n_docs)
    ]
    path.write_text("\n\n".join(docs) + "\n")
    return docs


# ---- corpora and split


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"document number {i} " + "x" * (i % 7) for i in range(200)]
    a, b = split_documents(docs, seed=0), split_documents(docs, seed=0)
    assert a == b
    sets = {k: set(v) for k, v in a.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(docs)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (180, 10, 10)
    # another seed gives another split; a shuffled corpus gives the same split (hash of the text, not the order)
    assert split_documents(docs, seed=1)["val"] != a["val"]
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    assert {k: set(v) for k, v in split_documents(shuffled, seed=0).items()} == sets


def test_duplicates_never_straddle_splits():
    docs = [f"doc {i}" for i in range(50)] * 2
    s = split_documents(docs)
    assert sum(len(v) for v in s.values()) == 50
    assert not set(s["train"]) & (set(s["val"]) | set(s["test"]))


def test_named_corpora():
    wiki = {s: load_documents("wiki", s) for s in corpora.SPLITS}
    assert sum(len(v) for v in wiki.values()) == 10033  # every lead paragraph, none twice
    assert len(wiki["val"]) == len(wiki["test"]) == 501
    assert not set(wiki["train"]) & set(wiki["val"])
    sotu = load_documents("sotu", "train")
    assert len(sotu) > 200 and all(len(d) > 1000 for d in sotu)  # one speech per document


def test_local_txt_jsonl_and_folder(tmp_path):
    docs = write_corpus(tmp_path / "a.txt", 30)
    got = (
        set(load_documents(tmp_path / "a.txt", "train"))
        | set(load_documents(tmp_path / "a.txt", "val"))
        | set(load_documents(tmp_path / "a.txt", "test"))
    )
    assert got == set(docs)
    lines = [json.dumps({"text": d}) if i % 2 else json.dumps(d) for i, d in enumerate(docs)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    assert set(load_documents(tmp_path / "b.jsonl", "train")) == set(load_documents(tmp_path / "a.txt", "train"))
    folder = tmp_path / "f"
    folder.mkdir()
    for i, d in enumerate(docs[:10]):
        (folder / f"{i}.txt").write_text(d)
    assert sum(len(load_documents(folder, s)) for s in corpora.SPLITS) == 10


@pytest.mark.parametrize(
    "case", ["missing", "empty", "blank", "unknown", "suffix", "badjson", "emptydir", "split", "two_docs"]
)
def test_bad_corpora(tmp_path, case):
    src = {
        "missing": tmp_path / "nope.txt",
        "empty": tmp_path / "e.txt",
        "blank": tmp_path / "b.txt",
        "unknown": "wikipedia-de",
        "suffix": tmp_path / "c.csv",
        "badjson": tmp_path / "j.jsonl",
        "emptydir": tmp_path / "d",
        "split": "wiki",
        "two_docs": tmp_path / "t.txt",
    }[case]
    (tmp_path / "e.txt").write_text("")
    (tmp_path / "b.txt").write_text("\n\n  \n")
    (tmp_path / "c.csv").write_text("a,b\n")
    (tmp_path / "j.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (tmp_path / "d").mkdir()
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    with pytest.raises(UserError) as e:
        load_documents(src, "dev" if case == "split" else "train")
    assert "\n" not in str(e.value)


def test_a_garbled_wiki_file_is_a_user_error_naming_it(tmp_path, monkeypatch):
    bad = tmp_path / "summaries.json"
    bad.write_text('{"A": {"extract": "cut short')
    monkeypatch.setattr(corpora.packages, "wiki_summaries", lambda: bad)
    with pytest.raises(UserError, match=r"summaries\.json \(the wiki corpus\) is not valid JSON"):
        load_documents("wiki", "train")


def test_source_hash_follows_content(tmp_path):
    write_corpus(tmp_path / "a.txt", 10, seed=0)
    h1 = resolve_source(tmp_path / "a.txt").hash
    write_corpus(tmp_path / "a.txt", 10, seed=1)
    assert resolve_source(tmp_path / "a.txt").hash != h1


# ---- tokenizers


def test_bpe_tokenizer(tmp_path):
    docs = write_corpus(tmp_path / "a.txt", 60)
    tok = build_tokenizer("bpe", docs, vocab_size=300)
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>"
    text = "The big cat ran home. Ünïcödé 123"  # byte-level: unseen characters still round-trip
    assert tok.decode(tok(text)["input_ids"]) == text
    assert fingerprint(build_tokenizer("bpe", docs, vocab_size=300)) == fingerprint(tok)  # deterministic
    with pytest.raises(UserError, match="supports a vocabulary of only"):
        build_tokenizer("bpe", docs, vocab_size=8192)
    with pytest.raises(UserError):
        build_tokenizer("bpe", docs, vocab_size=100)
    with pytest.raises(UserError):
        build_tokenizer("sentencepiece", docs)


def test_gpt2_and_pretrained_tokenizers(tmp_path):
    g = build_tokenizer("gpt2")
    assert len(g) == 50257 and g("Hello world")["input_ids"] == [15496, 995] and g.eos_token_id == 50256
    g.save_pretrained(tmp_path / "tok")
    p = build_tokenizer("pretrained", model_path=tmp_path / "tok")
    assert p("Hello world")["input_ids"] == [15496, 995]
    with pytest.raises(UserError):
        build_tokenizer("pretrained", model_path=tmp_path / "missing")
    with pytest.raises(UserError):
        build_tokenizer("pretrained")


# ---- token cache


def test_prepare_tokenises_once_and_reuses(tmp_path, monkeypatch):
    docs = write_corpus(tmp_path / "a.txt", 60)
    cache = tmp_path / "cache"
    tc = tokens.prepare(tmp_path / "a.txt", "bpe", vocab_size=300, cache_dir=cache)
    split = split_documents(docs)
    for s in corpora.SPLITS:
        arr = tc.tokens(s)
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
        m = tc.manifests[s]
        assert m["split"] == s and m["documents"] == len(split[s]) and m["tokens"] == len(arr)
        assert m["source_hash"] == resolve_source(tmp_path / "a.txt").hash
        assert m["tokenizer"]["fingerprint"] == fingerprint(tc.tokenizer)
        assert m["sha256"] == hashlib.sha256((tc.root / f"{s}.bin").read_bytes()).hexdigest()  # the file's bytes
        # packed as doc <eot> doc <eot> ...
        expected = []
        for d in split[s]:
            expected += tc.tokenizer(d, add_special_tokens=False)["input_ids"] + [tc.eot_id]
        assert arr.tolist() == expected
    assert json.loads((tc.root / "train.json").read_text()) == tc.manifests["train"]

    # a second prepare reads the cache: neither the tokenizer nor the arrays are built again
    def boom(*a, **k):
        raise AssertionError("re-tokenised")

    monkeypatch.setattr(tokens, "_write_split", boom)
    monkeypatch.setattr(tokens, "build_tokenizer", boom)
    again = tokens.prepare(tmp_path / "a.txt", "bpe", vocab_size=300, cache_dir=cache)
    assert np.array_equal(again.tokens("val"), tc.tokens("val")) and again.root == tc.root
    monkeypatch.undo()

    # a changed corpus or vocabulary gets its own entry
    write_corpus(tmp_path / "a.txt", 60, seed=5)
    assert tokens.prepare(tmp_path / "a.txt", "bpe", vocab_size=300, cache_dir=cache).root != tc.root
    assert tokens.prepare(tmp_path / "a.txt", "bpe", vocab_size=280, cache_dir=cache).root != tc.root


def test_prepare_rebuilds_a_truncated_array(tmp_path):
    write_corpus(tmp_path / "a.txt", 40)
    tc = tokens.prepare(tmp_path / "a.txt", "gpt2", cache_dir=tmp_path / "c")
    want = tc.tokens("train").tolist()
    (tc.root / "train.bin").write_bytes((tc.root / "train.bin").read_bytes()[:10])
    tc2 = tokens.prepare(tmp_path / "a.txt", "gpt2", cache_dir=tmp_path / "c")
    assert tc2.tokens("train").tolist() == want


def test_prepare_uses_ssa_cache_dir(monkeypatch, tmp_path):
    write_corpus(tmp_path / "a.txt", 40)
    monkeypatch.delenv("SSA_CACHE", raising=False)
    monkeypatch.setenv("SSA_CACHE_DIR", str(tmp_path / "x"))
    assert tokens.prepare(tmp_path / "a.txt", "gpt2").root.parent == tmp_path / "x" / "tokens"


def test_prepare_rebuilds_a_garbled_array_of_the_right_size(tmp_path, capsys):
    write_corpus(tmp_path / "a.txt", 40)
    tc = tokens.prepare(tmp_path / "a.txt", "gpt2", cache_dir=tmp_path / "c")
    want = tc.tokens("train").tolist()
    raw = bytearray((tc.root / "train.bin").read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = b"\xff" * 8  # same size, other tokens
    (tc.root / "train.bin").write_bytes(bytes(raw))
    capsys.readouterr()
    tc2 = tokens.prepare(tmp_path / "a.txt", "gpt2", cache_dir=tmp_path / "c")
    assert tc2.tokens("train").tolist() == want
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: token cache") and "train.bin is corrupt (its sha256" in err[0]


def test_prepare_rebuilds_a_garbled_tokenizer(tmp_path, capsys):
    write_corpus(tmp_path / "a.txt", 60)
    tc = tokens.prepare(tmp_path / "a.txt", "bpe", vocab_size=300, cache_dir=tmp_path / "c")
    want = {s: tc.tokens(s).tolist() for s in corpora.SPLITS}
    path = tc.root / "tokenizer" / "tokenizer.json"
    text = path.read_text()
    # valid JSON, a different vocabulary: loads fine, would tokenise differently
    i = text.index('"vocab"')
    j = text.index('":', i + 12)
    path.write_text(text[: j - 1] + "Q" + text[j:])
    capsys.readouterr()
    tc2 = tokens.prepare(tmp_path / "a.txt", "bpe", vocab_size=300, cache_dir=tmp_path / "c")
    assert fingerprint(tc2.tokenizer) == fingerprint(tc.tokenizer)
    assert {s: tc2.tokens(s).tolist() for s in corpora.SPLITS} == want
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "tokenizer.json is corrupt (its sha256" in err[0] and "rebuilding" in err[0]
    path.write_text("{not json")  # unreadable: same path back
    tc3 = tokens.prepare(tmp_path / "a.txt", "bpe", vocab_size=300, cache_dir=tmp_path / "c")
    assert fingerprint(tc3.tokenizer) == fingerprint(tc.tokenizer)
    assert "tokenizer.json is corrupt" in capsys.readouterr().err


def test_cache_files_follow_the_umask(tmp_path):
    import os
    import stat

    write_corpus(tmp_path / "a.txt", 40)
    old = os.umask(0o022)
    try:
        tc = tokens.prepare(tmp_path / "a.txt", "bpe", vocab_size=280, cache_dir=tmp_path / "c")
        os.umask(0o027)
        from selective_attention.utils.io import atomic_write_text

        other = atomic_write_text(tmp_path / "o.txt", "x")
    finally:
        os.umask(old)
    files = [tc.root / "train.bin", tc.root / "train.json", tc.root / "tokenizer" / "tokenizer.json"]
    assert [oct(stat.S_IMODE(f.stat().st_mode)) for f in files] == [oct(0o644)] * 3  # mkstemp alone gives 0o600
    assert stat.S_IMODE(other.stat().st_mode) == 0o640
