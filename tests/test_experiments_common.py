"""The studies' shared steps (experiments.common): saved evaluations reused by their settings, zero-shot accuracy
with its binomial standard error, and the TrainConfig every study run is built with (what decides reuse)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

import selective_attention.evaluate as evaluate_pkg
import selective_attention.hf as hf_pkg
from selective_attention.errors import UserError
from selective_attention.experiments import common, finetune, lm
from selective_attention.experiments import finetune_study as fs
from selective_attention.train import TrainConfig

# a zero-shot cache exactly as the fine-tuning study writes it beside a run's final model (runs/ft-study/base)
SAVED_ZERO_SHOT = {
    "settings": {"tasks": ["arc_easy", "piqa"], "limit": 500},
    "zero_shot": {
        "arc_easy": {"acc": 0.292, "n": 500, "stderr": 0.0203340109176719},
        "piqa": {"acc": 0.524, "n": 500, "stderr": 0.02233490541730589},
    },
}


def _never(*args, **kwargs):
    raise AssertionError("measured again although a saved evaluation with the same settings exists")


def test_cached_reuses_the_same_settings_and_measures_different_ones_again(tmp_path):
    path = tmp_path / "run" / "eval.json"
    path.parent.mkdir()
    path.write_text(json.dumps(SAVED_ZERO_SHOT))
    assert common.cached(path, {"tasks": ["arc_easy", "piqa"], "limit": 500}, _never) == SAVED_ZERO_SHOT
    calls = []

    def measure():
        calls.append(1)
        return {"zero_shot": {"arc_easy": {"acc": 0.5, "n": 2, "stderr": 0.5}}}

    new = common.cached(path, {"tasks": ["arc_easy"], "limit": 2}, measure)
    assert calls == [1]
    assert new == {"settings": {"tasks": ["arc_easy"], "limit": 2}, **measure()}
    assert json.loads(path.read_text()) == new and list(new) == ["settings", "zero_shot"]
    path.write_text("{torn")
    with pytest.raises(UserError, match="not valid JSON"):
        common.cached(path, {}, measure)


def test_the_fine_tuning_studys_saved_zero_shot_is_reused(tmp_path, monkeypatch):
    """zero_shot_of reads the cache the running study already wrote (same file, same settings keys)."""
    monkeypatch.setattr(evaluate_pkg, "zero_shot", _never)
    base = tmp_path / "base"
    base.mkdir()
    (base / fs.ZERO_SHOT_FILE).write_text(json.dumps(SAVED_ZERO_SHOT))
    assert fs.zero_shot_of(base / "final", fs.Config()) == SAVED_ZERO_SHOT["zero_shot"]
    # no tasks: nothing is loaded or measured, and an empty record is saved
    none = dataclasses.replace(fs.Config(), zero_shot_tasks=())
    assert fs.zero_shot_of(tmp_path / "other" / "final", none) == {}
    assert json.loads((tmp_path / "other" / fs.ZERO_SHOT_FILE).read_text()) == {
        "settings": {"tasks": [], "limit": 500},
        "zero_shot": {},
    }


def test_the_finetune_experiments_saved_evaluation_is_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_pkg, "load_pretrained", _never)
    cfg = finetune.Config()
    settings = {"eval_tokens": 32_768, "tasks": ["arc_easy", "piqa", "hellaswag"], "limit": 100}
    saved = {
        "settings": {**settings, "seq_len": 256, "data": "sotu"},
        "val_ppl": 21.5,
        "val_loss": math.log(21.5),
        "word_ppl": 40.0,
        "eval_tokens": 32_000,
        "zero_shot": {},
    }
    (tmp_path / finetune.EVAL_FILE).write_text(json.dumps(saved))
    assert finetune._evaluate(tmp_path, cfg) == saved
    with pytest.raises(AssertionError, match="measured again"):  # other settings: measured (here: refused)
        finetune._evaluate(tmp_path, dataclasses.replace(cfg, seq_len=128))


def test_zero_shot_accuracy_reports_n_and_the_binomial_standard_error(monkeypatch):
    seen = {}

    def fake(model, tokenizer, tasks, limit=None, max_length=None):
        seen.update(tasks=tasks, limit=limit, max_length=max_length)
        return {"arc_easy": {"acc": 0.25, "acc_stderr": 0.1, "n": 8, "max_length": 64}, "piqa": {"acc": 0.5, "n": 0}}

    monkeypatch.setattr(evaluate_pkg, "zero_shot", fake)
    res = common.zero_shot_accuracy("model", "tok", ("arc_easy", "piqa"), 0, max_length=64)
    assert seen == {"tasks": ["arc_easy", "piqa"], "limit": None, "max_length": 64}  # limit 0 = the full set
    assert res == {
        "arc_easy": {"acc": 0.25, "n": 8, "stderr": math.sqrt(0.25 * 0.75 / 8)},
        "piqa": {"acc": 0.5, "n": 0, "stderr": None},
    }
    common.zero_shot_accuracy("model", "tok", ("arc_easy",), 8)
    assert seen["limit"] == 8 and seen["max_length"] is None
    monkeypatch.setattr(evaluate_pkg, "zero_shot", _never)
    assert common.zero_shot_accuracy("model", "tok", (), 8) == {}


def test_every_study_run_trains_with_the_settings_its_saved_runs_were_made_with():
    """The TrainConfigs that decide whether a saved run is resumed, written out field by field: an LM search run,
    the fine-tuning study's base (from scratch: size and vocabulary set) and a fine-tune (TrainConfig's defaults
    for size and vocabulary: the base's come with init_from)."""
    out = Path("/OUT")
    search = dataclasses.replace(lm.Config(), **{**lm.BUDGETS["search"], "budget": "search"})
    run = next(r for r in lm.plan(out, search, [0, 1, 2]) if r.method == "ssa-c0.1-t10" and r.seed == 2)
    from selective_attention.config import SSAConfig

    # what every study run shares (experiments.common.study_train_config)
    shared = dict(seq_len=512, batch_size=8, eval_tokens=65_536, checkpoint_every=25, keep_checkpoints=1)
    assert lm.train_config(run, search, progress=False) == TrainConfig(
        data="wiki",
        size="study",
        vocab_size=2048,
        max_tokens=1_000_000,
        seed=2,
        out="/OUT/runs/wiki/ssa-c0.1-t10-seed2",
        lr=2e-3,
        eval_every=25,
        split_seed=0,
        progress=False,
        attention="ssa",
        ssa=SSAConfig(init="identity", position_init=0.1),
        temperature_lr=2e-3 * 10,
        **shared,
    )
    full = dataclasses.replace(fs.Config(), **{**fs.BUDGETS["full"], "budget": "full"})
    assert fs.base_config(out, full) == TrainConfig(
        data="wiki",
        size="study",
        vocab_size=2048,
        max_tokens=4_000_000,
        seed=0,
        out="/OUT/base",
        lr=2e-3,
        eval_every=50,
        split_seed=0,
        progress=False,
        attention="vanilla",
        **shared,
    )
    tune = fs.plan(out, full, [0, 1, 2])[6]
    assert (tune.method, tune.seed) == ("ssa", 1)
    assert fs.finetune_config(tune, out, full) == TrainConfig(
        data="sotu",
        init_from="/OUT/base/final",
        max_tokens=1_000_000,
        seed=1,
        out="/OUT/runs/sotu/ssa-seed1",
        lr=3e-4,
        eval_every=25,
        split_seed=0,
        progress=False,
        attention="ssa",
        temperature_lr=1e-2,
        **shared,
    )


def test_pooled_zero_shot_counts_examples_not_seed_repeats_of_them():
    """Three seeds answering the same 500 examples: the mean accuracy with the binomial error of 500 answers (not
    of 1,500); seeds that answered different numbers are an error; a run without a record gives None."""

    def row(acc: float, n: int = 500) -> dict:
        return {"zero_shot": {"arc_easy": {"acc": acc, "n": n, "stderr": 0.0}}}

    pooled = common.pooled_zero_shot([row(0.30), row(0.31), row(0.29)])
    assert pooled == {
        "arc_easy": {"acc": pytest.approx(0.30), "n": 500, "stderr": pytest.approx(math.sqrt(0.21 / 500))}
    }
    with pytest.raises(UserError, match=r"arc_easy: the seeds answered different numbers of examples \(\[200, 500\]\)"):
        common.pooled_zero_shot([row(0.3), row(0.3, n=200)])
    assert common.pooled_zero_shot([row(0.3), {"zero_shot": {}}]) is None


def _finetune_record(method: str, seed: int, val_ppl: float, curve_ppl: list[float]) -> dict:
    """A SmolLM2 fine-tune's record as ``finetune.run`` builds it: validations at 1k-4k tokens during training."""
    return {
        "method": method,
        "seed": seed,
        "curve": {"tokens": [1000.0, 2000.0, 3000.0, 4000.0], "ppl": curve_ppl},
        "curve_final_ppl": curve_ppl[-1],
        "tokens": 4000,
        "tokens_per_s": 100.0,
        "new_parameters": 0 if method == "vanilla" else 1_560,
        "temperatures": None,
        "val_ppl": val_ppl,
        "zero_shot": {"arc_easy": {"acc": 0.5, "n": 8, "stderr": 0.17677669529663687}},
    }


def test_the_finetune_experiment_reports_tokens_to_target_and_draws_its_figures(tmp_path):
    """Tokens-to-target reads each run's validations during training against vanilla's final one of the same
    seed (not the final 32k-token evaluation); a row that never reaches it says so; the three figures exist."""
    records = [
        _finetune_record("vanilla", 0, 20.0, [40.0, 35.0, 32.0, 30.0]),
        _finetune_record("vanilla", 1, 21.0, [41.0, 36.0, 33.0, 31.0]),
        _finetune_record("ssa", 0, 19.8, [38.0, 33.0, 30.0, 29.0]),  # vanilla's 30 at 3,000 tokens: 4/3 x
        _finetune_record("ssa", 1, 20.895, [39.0, 31.0, 30.0, 29.0]),  # 31 at 2,000 tokens: 2 x
        _finetune_record("ssa-temps", 0, 40.0, [60.0, 58.0, 57.0, 56.0]),
        _finetune_record("ssa-temps", 1, 42.0, [61.0, 59.0, 58.0, 57.0]),
    ]
    methods = finetune._aggregate(records)
    ssa, temps = methods["ssa"], methods["ssa-temps"]
    assert ssa["speedup_per_seed"] == pytest.approx([4000 / 3000, 4000 / 2000])
    assert ssa["speedup"] == pytest.approx((4 / 3 + 2) / 2) and ssa["speedup_reached"] == "2/2"
    assert ssa["paired_percent"]["mean"] == pytest.approx(-0.75)  # -1 % and -0.5 %
    assert temps["speedup_per_seed"] == [None, None] and temps["speedup"] is None
    assert "speedup" not in methods["vanilla"] and "paired_percent" not in methods["vanilla"]
    config = dataclasses.asdict(finetune.Config(budget="cpu"))
    results = {"config": config, "seeds": [0, 1], "model": "smollm2.gguf", "base": None, "methods": methods}
    text = finetune.summary({**results, "runs": records})
    row = next(line for line in text.splitlines() if line.startswith("| ssa |"))
    assert "1.67x (within noise: tie)" in row  # a tie with two seeds: never called a speed-up
    assert "not reached (0/2 seeds)" in next(line for line in text.splitlines() if line.startswith("| ssa-temps |"))
    finetune._figures(tmp_path, {**results, "runs": records})
    names = {"finetune-sotu.png", "finetune-sotu-paired.png", "finetune-sotu-tokens-to-target.png"}
    assert {p.name for p in tmp_path.glob("*.png")} == names


def _finished_finetune(run_dir: Path, config, val_ppl: float, curve: list[float]) -> None:
    """A fine-tune's directory as `ssa train` and `finetune._evaluate` leave it: run.json, metrics.jsonl with the
    validations during training, the saved evaluation."""
    run_dir.mkdir(parents=True)
    info = {"final_val_ppl": curve[-1], "tokens": 4000, "tokens_per_s": 60.0, "parameters": {"new": 0}}
    (run_dir / "run.json").write_text(json.dumps(info))
    lines = [{"step": 25 * (i + 1), "tokens": 1000 * (i + 1), "val_ppl": p} for i, p in enumerate(curve)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ev = {"settings": finetune._eval_settings(config), "val_ppl": val_ppl, "zero_shot": {}}
    (run_dir / finetune.EVAL_FILE).write_text(json.dumps(ev))


def test_the_finetune_experiments_tables_only_reads_finished_fine_tunes_and_trains_nothing(tmp_path, monkeypatch):
    """--tables-only: the tables of the fine-tunes finished and evaluated so far, the others listed as pending (an
    unfinished run, or one evaluated with other settings); nothing is trained or measured."""
    import selective_attention.train as train_pkg

    monkeypatch.setattr(train_pkg, "train", _never)
    monkeypatch.setattr(hf_pkg, "load_pretrained", _never)
    cfg = dataclasses.replace(
        finetune.Config(budget="cpu"), model=str(tmp_path / "model.gguf"), methods=("vanilla", "ssa")
    )
    out = tmp_path / "ft"
    _finished_finetune(out / "runs" / "vanilla-seed0", cfg, 30.0, [40.0, 35.0, 32.0, 31.0])
    _finished_finetune(out / "runs" / "ssa-seed0", cfg, 29.7, [39.0, 34.0, 31.0, 30.0])
    _finished_finetune(out / "runs" / "ssa-seed1", dataclasses.replace(cfg, zero_shot_limit=5), 29.0, [40.0, 30.0])
    (out / "runs" / "vanilla-seed1").mkdir()  # started, not finished
    res = finetune.run(out, cfg, [0, 1], progress=False, tables_only=True)
    assert res["pending"] == ["vanilla-seed1", "ssa-seed1"] and not res["complete"] and res["base"] is None
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [("vanilla", 0), ("ssa", 0)]
    ssa = res["methods"]["ssa"]
    assert ssa["paired_percent"]["mean"] == pytest.approx(-1.0) and ssa["paired_percent"]["n"] == 1
    assert ssa["speedup_per_seed"] == pytest.approx([4000 / 3000])  # vanilla's final 31 at 3,000 tokens
    text = (out / "summary.md").read_text()
    assert "**Incomplete**: 2 fine-tune(s) still to train or evaluate" in text and "| ssa | 0 |" in text
    assert (out / "finetune-sotu.png").is_file()
