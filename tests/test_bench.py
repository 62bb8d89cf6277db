"""The attention benchmark and the CPU peak-memory tracker (no timing assertions: ratios are printed, not tested)."""

import json

import torch

from selective_attention.bench.memory import peak_memory_bytes
from selective_attention.cli import main


def test_peak_memory_counts_live_storages():
    def work():
        a = torch.ones(1024, 256)  # 1 MiB
        b = a * 2  # 2 MiB live
        del a
        c = b + 1  # a freed: still 2 MiB live
        return c.sum()

    assert peak_memory_bytes(work, torch.device("cpu")) == 2 * 2**20 + 4  # + the 4-byte sum


def test_peak_memory_of_views_counted_once():
    def work():
        a = torch.zeros(1024, 256)
        return [a[i] for i in range(8)]

    assert peak_memory_bytes(work, torch.device("cpu")) == 2**20


def test_bench_attention_cli(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "attention", "--seq-lens", "16", "32", "--batch", "1", "--heads", "2", "--head-dim", "8",
               "--repeats", "1", "--warmup", "0", "--dtypes", "float32", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["T"] for r in rows] == [16, 32]
    for r in rows:
        for m in ("sdpa", "ssa", "naive"):
            assert r[f"{m}_ms"] > 0 and r[f"{m}_peak_mb"] > 0
        assert r["ssa_time_ratio"] == r["ssa_ms"] / r["sdpa_ms"]
        assert r["naive_peak_mb"] > r["sdpa_peak_mb"]  # the naive form keeps T x T matrices
    assert "SSA x" in capsys.readouterr().out


def test_bench_bad_argument(capsys):
    rc = main(["bench", "attention", "--repeats", "0", "--out", "/nonexistent/x.json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--repeats must be >= 1" in err


def test_bench_train_cli(tmp_path, capsys):
    out = tmp_path / "train.json"
    rc = main(["bench", "train", "--sizes", "tiny", "--seq-len", "16", "--batch-size", "2", "--rounds", "1",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["size"] == "tiny" and row["tokens_per_s"]["ssa"] > 0 and row["tokens_per_s"]["vanilla"] > 0
    assert row["parameters"]["ssa"]["new"] > 0 and row["parameters"]["vanilla"]["new"] == 0
    peak = row["peak_mb"]
    assert peak["ssa"] > 0 and row["ssa_over_vanilla_memory"] == peak["ssa"] / peak["vanilla"]
    assert "tiny" in capsys.readouterr().out
