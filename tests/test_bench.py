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


TINY_STACK = ["--layers", "1", "--d-model", "16", "--heads", "2", "--batch", "1", "--seq-len", "8", "--device", "cpu"]


def _check_memory_result(result: dict, modes: tuple[str, ...]) -> None:
    peak = result["peak_mb"]
    rows = [f"{a} {m}" for a in ("vanilla", "ssa") for m in modes] + ["ssa eager-no-recompute"]
    assert sorted(peak) == sorted(rows) and all(v > 0 for v in peak.values())
    # the ratios are of the bytes; dividing both by 2**20 is exact, so they equal the ratios of the MiB
    assert result["over_vanilla_eager"] == {r: peak[r] / peak["vanilla eager"] for r in rows}
    assert result["ssa_over_vanilla"] == {m: peak[f"ssa {m}"] / peak[f"vanilla {m}"] for m in modes}
    # SSA keeps its temperatures; without the recomputation it also keeps the scaled copies of q and v
    assert peak["ssa eager-no-recompute"] > peak["ssa eager"] > peak["vanilla eager"]


def test_bench_memory_cli_eager(tmp_path, capsys):
    from selective_attention.functional import recomputation_enabled
    from selective_attention.utils.memory import _LiveStorages

    out = tmp_path / "memory.json"
    assert main(["bench", "memory", *TINY_STACK, "--no-compile", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "memory" and result["config"]["compile"] is False
    _check_memory_result(result, ("eager",))
    printed = capsys.readouterr().out
    assert "ssa eager-no-recompute" in printed and f"eager {result['ssa_over_vanilla']['eager']:.3f}" in printed
    # what the measurement switched for itself is switched back
    assert recomputation_enabled()
    assert not _LiveStorages.is_infra_mode() and not torch._dynamo.config.error_on_recompile


def test_bench_memory_bad_shape(capsys):
    rc = main(["bench", "memory", *TINY_STACK, "--heads", "3", "--out", "/nonexistent/x.json"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "must be divisible by heads" in err


@pytest.mark.slow  # two compilations: ~15 s
def test_bench_memory_compiled(tmp_path):
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", *TINY_STACK, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["backend"] == "aot_eager_decomp_partition"
    _check_memory_result(result, ("eager", "compiled"))


def test_gpu_check_limits_the_memory_ratios_of_a_bench_file(tmp_path, capsys):
    """The GPU script checks `ssa bench memory`'s own file against its limit (no measurement of its own)."""
    import importlib.util
    from pathlib import Path

    out = tmp_path / "memory.json"
    assert main(["bench", "memory", *TINY_STACK, "--no-compile", "--out", str(out)]) == 0
    ratio = json.loads(out.read_text())["ssa_over_vanilla"]["eager"]
    capsys.readouterr()
    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec and spec.loader
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["ratios", str(out), "--max-memory-ratio", "10"]) == 0
    assert f"PASS memory eager SSA/vanilla: {ratio:.3f} (limit 10.0), cpu" in capsys.readouterr().out
    assert gpu_check.main(["ratios", str(out), "--max-memory-ratio", "1.0"]) == 1  # SSA needs more than vanilla
