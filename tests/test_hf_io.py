"""Save/load, parameter budget, training modes, the CLI and lm-eval on converted tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from selective_attention import SSAConfig, param_groups
from selective_attention.cli import main as ssa_main
from selective_attention.errors import UserError
from selective_attention.hf import convert, from_pretrained, load_pretrained, parameter_report
from selective_attention.temperature import temperature_parameters

EOT = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("sharing", ["shared", "mlp"])
def test_save_load_restores_the_converted_model_exactly(
    tmp_path: Path, family: str, sharing: str, tiny, ids, randomise_temperatures
) -> None:
    model = convert(tiny(family), SSAConfig(sharing=sharing))  # mlp width sized from the model (mlp_growth)
    randomise_temperatures(model)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["ssa"]["sharing"] == sharing and cfg["ssa"]["mlp_hidden"] == model.config.ssa["mlp_hidden"]
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))  # nothing to unpickle
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config._attn_implementation == "ssa"
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    eager = from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "ssa_eager"
    with torch.no_grad():
        torch.testing.assert_close(eager(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_from_pretrained_loads_a_plain_model_and_rejects_a_bad_dir(tmp_path: Path, tiny, ids) -> None:
    from selective_attention.errors import UserError

    model = tiny("gpt2")
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    assert not hasattr(loaded.config, "ssa") and not temperature_parameters(loaded)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="config.json"):
        from_pretrained(tmp_path / "nothing-here")


# ----------------------------------------------------------------------------------------- parameter budget


def _smollm2_135m_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )


@pytest.mark.parametrize("name", ["gpt2-124m", "smollm2-135m"])
def test_parameter_budget_on_real_shapes(name: str) -> None:
    make = {
        "gpt2-124m": lambda: GPT2LMHeadModel(GPT2Config()),
        "smollm2-135m": lambda: LlamaForCausalLM(_smollm2_135m_config()),
    }[name]
    expected_base = {"gpt2-124m": 124_439_808, "smollm2-135m": 134_515_008}[name]
    reports = {}
    for sharing in ("shared", "mlp"):
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = make()
        convert(model, SSAConfig(sharing=sharing))
        reports[sharing] = parameter_report(model)
    shared, mlp = reports["shared"], reports["mlp"]
    assert shared["base"] == mlp["base"] == expected_base
    assert shared["total"] == shared["base"] + shared["new"]
    assert 0 < shared["percent"] < 0.5
    assert 4.5 < mlp["percent"] < 5.5


# ------------------------------------------------------------------------------------------- training modes


def test_full_fine_tune_with_a_separate_temperature_learning_rate(tiny, ids) -> None:
    model = convert(tiny("llama")).train()
    groups = param_groups(model, lr=1e-3, temperature_lr=5e-2)
    by_name = {g["name"]: g for g in groups}
    assert by_name["temperature"]["lr"] == 5e-2 and by_name["decay"]["lr"] == 1e-3
    temp_ids = {id(p) for p in temperature_parameters(model)}
    assert {id(p) for p in by_name["temperature"]["params"]} == temp_ids
    opt = torch.optim.AdamW(groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids(B=2, T=12)
    loss0 = model(x, labels=x).loss
    loss0.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not move"


def test_temperatures_only_keeps_the_base_frozen(tiny, ids) -> None:
    model = convert(tiny("gpt2"), SSAConfig(sharing="mlp", mlp_hidden=8)).train()
    groups = param_groups(model, lr=1e-3, temperature_lr=1e-2, temperatures_only=True)
    assert [g["name"] for g in groups] == ["temperature"]
    opt = torch.optim.AdamW(groups)
    temp_ids = {id(p) for p in temperature_parameters(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids(B=2, T=12)
    for _ in range(2):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if id(p) in temp_ids:
            assert p.requires_grad and not torch.equal(p, before[n]), f"{n} did not move"
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[n]), f"{n} moved"


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_convert_writes_a_loadable_model_and_reports(
    tmp_path: Path, capsys, ids, byte_tokenizer, tiny_llama_257
) -> None:
    src = tmp_path / "plain"
    tiny_llama_257().save_pretrained(src)
    byte_tokenizer.save_pretrained(src)
    out = tmp_path / "ssa"
    rc = ssa_main(["convert", "--model", str(src), "--out", str(out), "--sharing", "mlp", "--report"])
    assert rc == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "ssa_parameters.json").read_text())
    assert f"{rep['new']:,}" in printed and 4.0 < rep["percent"] < 6.0
    model, tok = load_pretrained(out)
    assert model.config.ssa["sharing"] == "mlp" and tok is not None
    x = ids(B=1, T=6)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, tiny_llama_257()(x).logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out).eos_token == EOT
    # bad input: one line, exit code 2, no traceback
    assert ssa_main(["convert", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert ssa_main(["convert", "--model", str(src), "--out", str(out)]) == 2  # out not empty
    assert ssa_main(["convert", "--model", str(out), "--out", str(tmp_path / "y")]) == 2  # already converted
    err = capsys.readouterr().err
    assert "Traceback" not in err and "no such model" in err and "not empty" in err


# ------------------------------------------------------------------------------- file modes, --force hints


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_save_pretrained_follows_the_umask_and_loads_back(tmp_path: Path, ids, byte_tokenizer, tiny_llama_257) -> None:
    """Every file we write gets 0o666 minus the umask (directories 0o777 minus it), not safetensors' 0o600."""
    import os

    from selective_attention.hf.save import MANIFEST, save_pretrained

    model = convert(tiny_llama_257(), SSAConfig())
    src = tmp_path / "plain"
    tiny_llama_257().save_pretrained(src)
    old = os.umask(0o002)  # not the usual 0o022: a file left at a library's own mode shows
    try:
        out = save_pretrained(model, tmp_path / "ours", byte_tokenizer)
        assert ssa_main(["convert", "--model", str(src), "--out", str(tmp_path / "converted")]) == 0
    finally:
        os.umask(old)
    for root in (out, tmp_path / "converted"):
        modes = _modes(root)
        assert {"model.safetensors", "config.json", MANIFEST} <= set(modes)
        wrong = {k: oct(m) for k, m in modes.items() if m != (0o775 if (root / k).is_dir() else 0o664)}
        assert not wrong, wrong
    assert "tokenizer.json" in _modes(out)
    x = ids(B=1, T=6)
    with torch.no_grad():
        assert torch.equal(from_pretrained(out)(x).logits, model(x).logits)
    with pytest.raises(UserError, match="pass --force to replace it"):
        save_pretrained(model, out)
    save_pretrained(model, out, force=True)  # a directory written this way: replaced
    assert "tokenizer.json" not in _modes(out)


def test_convert_offers_force_only_where_it_is_accepted(tmp_path: Path, capsys, tiny_llama_257) -> None:
    src = tmp_path / "plain"
    tiny_llama_257().save_pretrained(src)
    converted, edited, foreign, a_file = (tmp_path / n for n in ("converted", "edited", "foreign", "file.txt"))
    for d in (converted, edited):
        assert ssa_main(["convert", "--model", str(src), "--out", str(d)]) == 0
    (edited / "my_eval.json").write_text("{}")  # no longer only what the tool wrote
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    a_file.write_text("mine")
    capsys.readouterr()
    offered = set()
    for out in (converted, edited, foreign, a_file):
        assert ssa_main(["convert", "--model", str(src), "--out", str(out), "--no-value"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err
        forced = ssa_main(["convert", "--model", str(src), "--out", str(out), "--no-value", "--force"])
        capsys.readouterr()
        if "pass --force" in err:  # offered: following the hint works
            offered.add(out.name)
            assert forced == 0 and json.loads((out / "config.json").read_text())["ssa"]["value"] is False
        else:  # not offered, and it says what --force would not do
            assert "--force only replaces a directory that ssa convert wrote" in err, err
            assert forced == 2
    assert offered == {"converted"}
    assert (edited / "my_eval.json").read_text() == "{}" and (foreign / "notes.txt").read_text() == "mine"
    assert a_file.read_text() == "mine"
