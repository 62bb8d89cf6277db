"""``ssa experiment finetune-study``: one base pre-trained once and reused, fine-tunes paired per seed against
vanilla fine-tuning on the same validation tokens, temperatures recorded, tables rebuilt from disk."""

import dataclasses
import json

import pytest

from selective_attention.errors import UserError
from selective_attention.experiments import finetune_study as fs
from selective_attention.experiments import run_experiment

TINY = {
    "base_tokens": 2_048,
    "base_eval_every": 4,
    "max_tokens": 1_024,
    "eval_every": 2,
    "eval_tokens": 1_024,
    "length_windows": 1,
    "length_multipliers": (1, 2),
    "zero_shot_tasks": (),
    "checkpoint_every": 8,
    "methods": ("vanilla", "ssa", "const"),
}


def test_study_pretrains_once_fine_tunes_pairs_and_rebuilds(tmp_path):
    out = tmp_path / "ft"
    res = run_experiment("finetune-study", out, seeds=2, budget="quick", progress=False, **TINY)
    assert res["complete"] and res["pending"] == []
    base_info = json.loads((out / "base" / "run.json").read_text())
    assert base_info["attention"] == "vanilla" and base_info["tokens"] >= 2_048
    runs = {(r["method"], r["seed"]): r for r in res["runs"]}
    assert set(runs) == {(m, s) for m in TINY["methods"] for s in (0, 1)}
    for m, s in runs:
        info = json.loads((out / "runs" / "sotu" / f"{m}-seed{s}" / "run.json").read_text())
        assert info["config"]["init_from"].endswith("base/final") and info["seed"] == s
    methods = res["methods"]
    diffs = [
        100 * (runs["ssa", s]["val_ppl"] - runs["vanilla", s]["val_ppl"]) / runs["vanilla", s]["val_ppl"]
        for s in (0, 1)
    ]
    assert methods["ssa"]["paired_percent"]["mean"] == pytest.approx(sum(diffs) / 2)
    t = methods["ssa"]["temperatures"]  # identity start, c at 1 x the fine-tuning temperature lr
    assert t["c_start"] == 0.0 and t["lr"] == 1e-2 and t["c_reach"] == pytest.approx(t["lr_sum"]) and t["moved"]
    assert methods["const"]["new_parameters"] == 2 * 4 and methods["vanilla"]["temperatures"] is None
    summary = (out / "summary.md").read_text()
    assert "| ssa |" in summary and "Where the temperatures ended" in summary
    assert (out / "finetune-sotu-tokens-to-target.png").is_file() or all(
        v is None for v in methods["ssa"]["speedup_per_seed"]
    )
    # rerun: nothing trains again (the base and every fine-tune are reused), the same tables
    mtime = (out / "base" / "run.json").stat().st_mtime_ns
    again = run_experiment("finetune-study", out, seeds=2, budget="quick", progress=False, tables_only=True, **TINY)
    assert again["methods"]["ssa"]["paired_percent"] == methods["ssa"]["paired_percent"]
    fs.run(
        out,
        dataclasses.replace(fs.Config(), **{**fs.BUDGETS["quick"], **TINY, "budget": "quick"}),
        [0, 1],
        progress=False,
    )
    assert (out / "base" / "run.json").stat().st_mtime_ns == mtime
    # a fine-tune counts as evaluated (nothing left to train) only with both of its evaluations saved
    config = dataclasses.replace(fs.Config(), **{**fs.BUDGETS["quick"], **TINY, "budget": "quick"})
    study = fs.FinetuneStudy(out, config, (0, 1))
    first = study.plan()[0]
    assert all(study.is_evaluated(r) for r in study.plan())
    (first.path / fs.ZERO_SHOT_FILE).rename(first.path / "zero-shot.bak")
    assert not study.is_evaluated(first)
    (first.path / "zero-shot.bak").rename(first.path / fs.ZERO_SHOT_FILE)
    assert not fs.FinetuneStudy(out, dataclasses.replace(config, length_windows=2), (0, 1)).is_evaluated(first)

    # the same fine-tunes by two worker processes (the base copied: pre-trained once), each run trained exactly
    # once, the same tables up to float rounding (each worker runs single-threaded)
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(out / "base", twin / "base")
    par = run_experiment("finetune-study", twin, seeds=2, budget="quick", progress=False, jobs=2, **TINY)
    assert par["complete"] and (twin / "base" / "run.json").stat().st_mtime_ns == mtime
    for m, d in par["methods"].items():
        assert d["val_ppl_per_seed"] == pytest.approx(methods[m]["val_ppl_per_seed"], rel=1e-4)
    for log in sorted(twin.glob("runs/sotu/*/metrics.jsonl")):
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if "val_ppl" in line]
        assert steps == sorted(set(steps))  # no step trained (and validated) twice
    with pytest.raises(UserError, match="--jobs must be at least 1"):
        run_experiment("finetune-study", twin, budget="quick", jobs=0, **TINY)


def test_unknown_row_is_a_one_line_error():
    from selective_attention.errors import UserError

    with pytest.raises(UserError, match="unknown row"):
        fs.validate(dataclasses.replace(fs.Config(), methods=("vanilla", "sparse")), [0])
    with pytest.raises(UserError, match="keep vanilla"):
        fs.validate(dataclasses.replace(fs.Config(), methods=("ssa",)), [0])
