"""Temperatures that a norm after the projection would cancel act on the norm's output (Gemma3n's k_norm /
v_norm, Phi / StableLM k_layernorm); KV-sharing layers keep their query temperature; an unknown normalisation
is refused, never silently erasing a temperature."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from selective_attention import SSAConfig
from selective_attention.hf import convert, ssa_state, ssa_temperatures

SMALL = dict(
    vocab_size=97,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)


def build(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "Gemma3n":  # 4 layers, the last 2 reuse the keys / values of the first 2 (KV sharing)
        cfg = transformers.Gemma3nTextConfig(
            **SMALL,
            vocab_size_per_layer_input=97,
            hidden_size_per_layer_input=4,
            num_hidden_layers=4,
            head_dim=8,
            num_kv_shared_layers=2,
            layer_types=["sliding_attention", "full_attention"] * 2,
            sliding_window=16,
            altup_num_inputs=2,
            laurel_rank=4,
            activation_sparsity_pattern=[0.0] * 4,
        )
        return transformers.Gemma3nForCausalLM(cfg).eval()
    cfg = getattr(transformers, f"{family}Config")(**SMALL, num_hidden_layers=2, qk_layernorm=True)
    return getattr(transformers, f"{family}ForCausalLM")(cfg).eval()


@torch.no_grad()
def _randomise(model: nn.Module, target: str, layers: tuple[str, ...] = ()) -> None:
    g = torch.Generator().manual_seed(1)
    for name, m in model.named_modules():
        if hasattr(m, "_ssa_state") and (not layers or any(name.startswith(p) for p in layers)):
            for p in ssa_temperatures(m).fns[target].parameters():
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    ("family", "target"), [("Gemma3n", "value"), ("Gemma3n", "key"), ("Phi", "key"), ("StableLm", "key")]
)
def test_a_temperature_after_a_norm_takes_effect(family: str, target: str, ids, check_cached_decoding) -> None:
    x = ids(B=2, T=9)
    with torch.no_grad():
        ref = build(family)(x).logits
    cfg = SSAConfig(query=False, value=target == "value", key=target == "key")
    model = convert(build(family), cfg)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)  # identity at init
    _randomise(model, target)
    with torch.no_grad():
        full = model(x).logits
    assert (full - ref).abs().max() > 1e-2  # a norm after the temperature would leave ~1e-5
    check_cached_decoding(model, x, full)


def test_kv_sharing_layers_keep_their_query_temperature(ids) -> None:
    x = ids(B=2, T=9)
    with torch.no_grad():
        ref = build("Gemma3n")(x).logits
    model = convert(build("Gemma3n"))
    shared = [a for n, a in model.named_modules() if n.endswith("layers.3.self_attn")][0]
    assert ssa_state(shared).site.kv_shared and list(ssa_temperatures(shared).fns) == ["query"]
    _randomise(model, "query", layers=("model.layers.3.",))  # only the last, KV-sharing layer
    with torch.no_grad():
        assert (model(x).logits - ref).abs().max() > 1e-2


def test_an_unknown_normalisation_is_refused_naming_module_and_temperature(tiny) -> None:
    model = tiny("llama")
    model.model.layers[1].self_attn.kv_norm = nn.LayerNorm(8)  # SSA does not know where this one acts
    with pytest.raises(ValueError, match=r"value temperature: model\.layers\.1\.self_attn has 'kv_norm'"):
        convert(model)
    assert convert(model, SSAConfig(value=False)).config._attn_implementation == "ssa"  # a query one is safe


def test_a_temperature_whose_norm_did_not_run_is_an_error(ids) -> None:
    """If a forward skips the norm a key temperature waits for, the temperature was not applied: refuse."""
    model = convert(build("Phi"), SSAConfig(query=False, value=False, key=True))
    attn = next(m for m in model.modules() if hasattr(m, "_ssa_state"))
    norm_call = type(attn.k_layernorm).__call__

    def skip_the_norm(module, *args, **kwargs):  # a code path that bypasses the module (and so its hooks)
        return module.forward(*args, **kwargs) if module is attn.k_layernorm else norm_call(module, *args, **kwargs)

    type(attn.k_layernorm).__call__ = skip_the_norm
    try:
        with pytest.raises(RuntimeError, match="key temperature waits for a normalisation"):
            model(ids(B=1, T=5))
    finally:
        type(attn.k_layernorm).__call__ = norm_call
