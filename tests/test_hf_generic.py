"""The generic path: families beyond GPT-2 / GPT-NeoX / Llama whose attention calls the transformers
AttentionInterface (Phi-3's fused qkv_proj, Qwen3's q/k norms, OPT, Gemma2's soft-capping) convert exactly."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

from selective_attention import SSAConfig
from selective_attention.hf import convert
from selective_attention.hf.convert import find_sites
from test_hf_convert import ids, randomise_temperatures

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0)
KWARGS = {
    "Phi3": COMMON,
    "Qwen3": COMMON,
    "Gemma2": COMMON,
    "OPT": dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0),
}


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(**KWARGS[family])
    return getattr(transformers, f"{family}ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("family", list(KWARGS))
def test_generic_family_identity_and_cached_decoding(family: str) -> None:
    model = build(family)
    x = ids(B=2, T=9)
    with torch.no_grad():
        ref = model(x).logits
    convert(model)
    assert len(find_sites(build(family))) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=0)
    randomise_temperatures(model)
    with torch.no_grad():
        full = model(x).logits
        assert (full - ref).abs().max() > 1e-3
        cache = DynamicCache(config=model.config)
        model(x[:, :5], past_key_values=cache, use_cache=True)
        for t in range(5, 9):
            step = model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-4, rtol=0)


def test_key_temperature_refused_where_keys_are_normalised() -> None:
    with pytest.raises(ValueError, match="key temperature"):
        convert(build("Qwen3"), SSAConfig(key=True))


def test_unsupported_transformers_family_is_named() -> None:
    cfg = transformers.FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        convert(transformers.FalconForCausalLM(cfg))
