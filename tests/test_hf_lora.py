"""SSA composes with PEFT LoRA in both orders: the model equals SSA on the LoRA-merged weights; temperatures train
next to the adapters and save / load with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selective_attention import SSAConfig
from selective_attention.hf import convert, from_pretrained
from selective_attention.temperature import temperature_parameters

peft = pytest.importorskip("peft")

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "neox": ["query_key_value"]}


def _lora(family: str):
    # init_lora_weights=False: random B, so the LoRA delta is not zero and a missed delta shows
    return peft.LoraConfig(
        target_modules=TARGETS[family], r=4, init_lora_weights=False, modules_to_save=["ssa_temperature"]
    )


@pytest.mark.parametrize("order", ["convert_then_lora", "lora_then_convert"])
def test_ssa_with_lora_equals_ssa_on_the_merged_model(
    family: str, order: str, tiny, ids, randomise_temperatures
) -> None:
    x = ids()
    if order == "convert_then_lora":
        model = convert(tiny(family), SSAConfig(key=family != "llama"))
        randomise_temperatures(model)
        pm = peft.get_peft_model(model, _lora(family))
    else:
        lora = peft.LoraConfig(target_modules=TARGETS[family], r=4, init_lora_weights=False)
        pm = peft.get_peft_model(tiny(family), lora)
        convert(pm, SSAConfig(key=family != "llama"))
        randomise_temperatures(pm)
    with torch.no_grad():
        out = pm(x).logits
        with pm.disable_adapter():
            no_lora = pm(x).logits
    assert (out - no_lora).abs().max() > 1e-2  # the LoRA delta is there
    merged = pm.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(out, merged(x).logits, atol=1e-5, rtol=0)


def test_temperatures_train_next_to_the_adapters_and_round_trip(tmp_path: Path, tiny, ids) -> None:
    from selective_attention.hf.lora import load_lora, lora_config_for, save_lora

    base_dir = tmp_path / "base"
    tiny("llama").save_pretrained(base_dir)
    model = convert(from_pretrained(base_dir))
    pm = peft.get_peft_model(model, lora_config_for(model, target_modules=["q_proj", "v_proj"], r=4))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("ssa_temperature" in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = ids(B=2, T=12)
    for _ in range(3):
        opt.zero_grad()
        pm(x, labels=x).loss.backward()
        opt.step()
    pm.eval()
    with torch.no_grad():
        out = pm(x).logits
        with pm.disable_adapter():
            plain = pm(x).logits  # identity temperatures, no LoRA: the base model
    assert (out - plain).abs().max() > 1e-3
    trained = [p for n, p in pm.named_parameters() if "modules_to_save" in n]
    assert trained and all(p.abs().sum() > 0 for p in trained if p.dim() == 2)  # read-outs moved off zero
    save_lora(pm, tmp_path / "adapter")
    from selective_attention.utils.io import umask

    for f in (tmp_path / "adapter").iterdir():  # every file as open() makes it (safetensors alone writes 0o600)
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask(), f.name
    loaded = load_lora(base_dir, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out)
    merged = loaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    again = from_pretrained(tmp_path / "merged")
    assert len(temperature_parameters(again)) == len(temperature_parameters(merged))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, out, atol=1e-5, rtol=0)


def test_a_garbled_adapter_config_is_a_user_error(tmp_path: Path, tiny) -> None:
    from selective_attention.errors import UserError
    from selective_attention.hf.lora import SSA_CONFIG_FILE, load_lora

    tiny("llama").save_pretrained(tmp_path / "base")  # plain: load_lora converts it with the saved SSA config
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / SSA_CONFIG_FILE).write_text('{"query": true, ')
    with pytest.raises(UserError, match=r"ssa_config\.json \(the adapter's SSA config\) is not valid JSON"):
        load_lora(tmp_path / "base", tmp_path / "adapter")


def test_modules_to_save_copies_are_counted_and_trained_once(tiny) -> None:
    from selective_attention.hf import parameter_report
    from selective_attention.hf.lora import lora_config_for

    model = convert(tiny("llama"), SSAConfig())
    before = parameter_report(model)["new"]
    n_temps = len(temperature_parameters(model))
    pm = peft.get_peft_model(model, lora_config_for(model, target_modules=["q_proj", "v_proj"], r=4))
    temps = temperature_parameters(pm)
    # PEFT keeps a frozen original beside the trained copy: only the trained copy is a temperature parameter
    assert len(temps) == n_temps and all(p.requires_grad for p in temps)
    assert parameter_report(pm)["new"] == before
