"""litgpt-style parity: a converted Hugging Face Llama attention and ``SelectiveSelfAttention`` with the same
weights and the same temperatures compute the same function (the two implementations of SSA agree)."""

from __future__ import annotations

import pytest
import torch

from selective_attention import SelectiveSelfAttention, SSAConfig
from selective_attention.hf import convert
from selective_attention.hf.state import TEMPERATURE_ATTR


@pytest.mark.parametrize(
    "cfg", [SSAConfig(), SSAConfig(sharing="mlp", mlp_hidden=8), SSAConfig(key=True)], ids=["shared", "mlp", "qkv"]
)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_converted_llama_attention_equals_the_layer(cfg: SSAConfig, kv_heads: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rope_theta=10000.0,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_cfg).eval()
    convert(model, cfg)
    attn = model.model.layers[0].self_attn
    temps = getattr(attn, TEMPERATURE_ATTR)
    with torch.no_grad():  # temperatures away from identity, so that every term matters
        for p in temps.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    seen: dict[str, torch.Tensor] = {}
    attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(x=kwargs["hidden_states"], y=out[0]), with_kwargs=True
    )
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)

    layer = SelectiveSelfAttention(64, 4, kv_heads, config=cfg, rope=True, rope_base=10000.0).eval()
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer, name).weight.copy_(getattr(attn, name).weight)
        layer.temperature.load_state_dict(temps.state_dict())
        out = layer(seen["x"])
    torch.testing.assert_close(out, seen["y"], atol=1e-5, rtol=1e-5)
