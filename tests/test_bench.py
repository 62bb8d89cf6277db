"""The attention benchmark and the CPU peak-memory tracker (no timing assertions: ratios are printed, not tested)."""

import json

import pytest
import torch

from selective_attention.cli import main
from selective_attention.utils.memory import peak_memory_bytes


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
    rc = main(
        [
            "bench",
            "attention",
            "--seq-lens",
            "16",
            "32",
            "--batch",
            "1",
            "--heads",
            "2",
            "--head-dim",
            "8",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--dtypes",
            "float32",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["T"] for r in rows] == [16, 32]
    for r in rows:
        for m in ("sdpa", "ssa", "naive"):
            assert r[f"{m}_ms"] > 0 and r[f"{m}_peak_mb"] > 0
        assert r["naive_peak_mb"] > r["sdpa_peak_mb"]  # the naive form keeps T x T matrices
        assert r["naive_peak_mb"] > r["ssa_peak_mb"]  # ... and the fused SSA op does not
    assert "SSA x" in capsys.readouterr().out


def test_bench_bad_argument(capsys):
    rc = main(["bench", "attention", "--repeats", "0", "--out", "/nonexistent/x.json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--repeats must be >= 1" in err


def _bench_train(tmp_path, *extra: str) -> dict:
    out = tmp_path / "train.json"
    rc = main(
        [
            "bench",
            "train",
            "--sizes",
            "tiny",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--rounds",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def _check_mode(d: dict, memory: bool = True) -> None:
    assert d["tokens_per_s"]["ssa"] > 0 and d["tokens_per_s"]["vanilla"] > 0
    assert len(d["all_rounds"]["ssa"]) == 1
    if not memory:  # compiled on CPU: the peak tracker would only see an eager run, so nothing is reported
        assert "peak_mb" not in d and "ssa_over_vanilla_memory" not in d
        return
    # SSA's step keeps its temperature parameters, gradients, AdamW moments and tau tensors: more memory
    assert d["peak_mb"]["ssa"] > d["peak_mb"]["vanilla"] > 0


def test_bench_train_cli(tmp_path, capsys):
    result = _bench_train(tmp_path)
    row = result["rows"][0]
    assert row["size"] == "tiny" and result["compile"] is False and "compiled" not in row
    p = row["parameters"]
    assert p["vanilla"]["new"] == 0 and p["ssa"]["new"] > 0
    assert p["ssa"]["total"] - p["vanilla"]["total"] == p["ssa"]["new"]  # same base model, SSA on top
    _check_mode(row["eager"])
    assert row["tokens_per_s"] == row["eager"]["tokens_per_s"]  # the earlier layout's keys still there
    assert "tiny" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_train_compile(tmp_path, capsys):
    row = _bench_train(tmp_path, "--compile")["rows"][0]
    _check_mode(row["eager"])
    _check_mode(row["compiled"], memory=row["device"].startswith("cuda"))
    assert "compiled" in capsys.readouterr().out


def test_bench_train_bad_device(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc = main(["bench", "train", "--device", "cuda", "--out", "/nonexistent/x.json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no CUDA device" in err
