"""Converted models stay SSA on the paths people take: switching the attention implementation, GPT-2's upcast
path, quantised (integer) base weights, torch.compile, loading failures, and ``ssa convert --force``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selective_attention import SSAConfig
from selective_attention.cli import main as ssa_main
from selective_attention.errors import UserError
from selective_attention.hf import convert, load_pretrained
from selective_attention.temperature import temperature_parameters

# ------------------------------------------------------------------------------ set_attn_implementation (6)


def test_set_attn_implementation_keeps_the_query_temperature(tiny, ids, randomise_temperatures) -> None:
    model = convert(tiny("llama"), SSAConfig(value=False))  # query only: a dropped tau_q is the whole effect
    randomise_temperatures(model)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "ssa_eager"
        torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0)
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "ssa"
        assert torch.equal(model(x).logits, ref)
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        model.set_attn_implementation("flash_attention_2")
    # going around it (the inner model shares the config): the forward refuses instead of dropping tau_q
    type(model.model).set_attn_implementation(model.model, "sdpa")
    with pytest.raises(RuntimeError, match="drops the query temperature"):
        model(x)


# ------------------------------------------------------------------------------------ GPT-2 upcast path (7)


def test_gpt2_reorder_and_upcast_attn_is_kept_under_ssa_eager(tiny, ids) -> None:
    base = tiny("gpt2", reorder_and_upcast_attn=True).half()
    base.set_attn_implementation("eager")
    x = ids()
    with torch.no_grad():
        ref = base(x).logits
        out = convert(base, backend="eager")(x).logits
    assert base.config._attn_implementation == "ssa_eager"
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------ quantised weights (8)


class Int8Linear(nn.Linear):
    """A weight-only int8 linear layer (as 8-bit quantisers store it): int8 weight, float scale per row."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None)
        scale = lin.weight.detach().abs().amax(1, keepdim=True) / 127
        self.weight = nn.Parameter((lin.weight.detach() / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if lin.bias is not None:
            self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


def test_quantised_projection_weights_never_make_the_temperatures_integer(tiny, ids) -> None:
    model = tiny("llama")
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, Int8Linear(getattr(layer.self_attn, name)))
    assert next(model.model.layers[0].self_attn.parameters()).dtype == torch.int8
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    convert(model, SSAConfig(sharing="mlp", mlp_hidden=8))
    temps = temperature_parameters(model)
    assert temps and all(p.dtype == torch.float32 for p in temps)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    model.train()
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None for p in temps)


# -------------------------------------------------------------------------------------- torch.compile (9)


@pytest.mark.slow
def test_torch_compile_of_a_converted_model_matches_eager(tiny, ids, randomise_temperatures) -> None:
    model = convert(tiny("llama")).train()
    randomise_temperatures(model)
    x = ids()
    loss = model(x, labels=x, use_cache=False).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_c = compiled(x, labels=x, use_cache=False).loss
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=0)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------- load_pretrained


def test_load_pretrained_raises_one_line_user_errors(tmp_path: Path, tiny) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    no_weights = tmp_path / "no_weights"
    tiny("gpt2").config.save_pretrained(no_weights)
    bad_gguf = tmp_path / "model.gguf"
    bad_gguf.write_bytes(b"not a gguf file")
    for path in (broken, no_weights, bad_gguf, tmp_path / "missing"):
        with pytest.raises(UserError) as e:
            load_pretrained(path)
        assert "\n" not in str(e.value) and str(path.name) in str(e.value)


def test_load_pretrained_gives_float32_master_weights(tmp_path: Path, tiny) -> None:
    tiny("llama").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, _ = load_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ------------------------------------------------------------------------------------- convert --force (10)


@pytest.fixture
def plain_model_dir(tmp_path: Path, tiny_llama_257) -> Path:
    src = tmp_path / "plain"
    tiny_llama_257().save_pretrained(src)
    return src


def test_force_never_removes_what_the_tool_did_not_write(tmp_path: Path, plain_model_dir: Path, capsys) -> None:
    user_dir = tmp_path / "mine"
    (user_dir / "sub").mkdir(parents=True)
    (user_dir / "sub" / "notes.txt").write_text("keep me")
    user_file = tmp_path / "file.txt"
    user_file.write_text("keep me too")
    for out in (user_dir, user_file):
        assert ssa_main(["convert", "--model", str(plain_model_dir), "--out", str(out), "--force"]) == 2
    assert (user_dir / "sub" / "notes.txt").read_text() == "keep me" and user_file.read_text() == "keep me too"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not written by ssa convert" in err


def test_force_replaces_an_earlier_conversion_only_while_it_holds_only_its_own_files(
    tmp_path: Path, plain_model_dir: Path
) -> None:
    out = tmp_path / "ssa"
    assert ssa_main(["convert", "--model", str(plain_model_dir), "--out", str(out)]) == 0
    manifest = json.loads((out / "ssa-manifest.json").read_text())
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert ssa_main(["convert", "--model", str(plain_model_dir), "--out", str(out), "--no-value"]) == 2  # no --force
    assert ssa_main(["convert", "--model", str(plain_model_dir), "--out", str(out), "--no-value", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["ssa"]["value"] is False
    (out / "my_eval.json").write_text("{}")  # the user added a file: no longer only ours
    assert ssa_main(["convert", "--model", str(plain_model_dir), "--out", str(out), "--force"]) == 2
    assert (out / "my_eval.json").is_file()


def test_a_converted_directory_follows_the_umask(tmp_path: Path, plain_model_dir: Path) -> None:
    """Shared on a cluster: the directory and its files get the user's usual modes, not mkdtemp's / safetensors'
    private 0o700 / 0o600."""
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "ssa"
        assert ssa_main(["convert", "--model", str(plain_model_dir), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["ssa-manifest.json"] == 0o644, modes
