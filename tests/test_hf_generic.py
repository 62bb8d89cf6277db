"""The generic path: families beyond GPT-2 / GPT-NeoX / Llama whose attention calls the transformers
AttentionInterface (Phi-3's fused qkv_proj, Qwen3's q/k norms, OPT, Gemma2's soft-capping) convert exactly."""

from __future__ import annotations

import pytest
import torch
import transformers

from selective_attention import SSAConfig
from selective_attention.hf import convert
from selective_attention.hf.adapters import find_sites

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
KWARGS = {
    "Phi3": COMMON,
    "Qwen3": COMMON,
    "Gemma2": COMMON,
    "OPT": dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        pad_token_id=0,
    ),
}


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(**KWARGS[family])
    return getattr(transformers, f"{family}ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("family", list(KWARGS))
def test_generic_family_identity_and_cached_decoding(
    family: str, ids, randomise_temperatures, check_cached_decoding
) -> None:
    model = build(family)
    x = ids(B=2, T=9)
    with torch.no_grad():
        ref = model(x).logits
    convert(model)
    assert len(find_sites(build(family))) == 2
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    randomise_temperatures(model)
    with torch.no_grad():
        full = model(x).logits
        assert (full - ref).abs().max() > 1e-3
    check_cached_decoding(model, x, full)


def test_key_temperature_acts_after_the_key_norm(ids, randomise_temperatures, check_cached_decoding) -> None:
    """Qwen3 normalises keys (k_norm): the key temperature multiplies the norm's output, so it is not erased."""
    base = build("Qwen3")
    x = ids(B=2, T=9)
    with torch.no_grad():
        ref = base(x).logits
    model = convert(build("Qwen3"), SSAConfig(query=False, value=False, key=True))
    randomise_temperatures(model)
    with torch.no_grad():
        full = model(x).logits
        assert (full - ref).abs().max() > 1e-2
    check_cached_decoding(model, x, full)


def test_unsupported_transformers_family_is_named() -> None:
    cfg = transformers.FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        convert(transformers.FalconForCausalLM(cfg))


def test_a_projection_that_is_not_linear_or_no_head_size_is_a_value_error_naming_the_module() -> None:
    from torch import nn

    from selective_attention.hf.adapters.common import head_dim_of, projection_dims, separate_site

    class OddAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Identity(), nn.Linear(8, 8)

    attn = OddAttention()
    assert projection_dims(attn, "q_proj") == (8, 8)
    assert head_dim_of(attn, 2) == 4  # no head_dim anywhere: q_proj's width over the head count
    with pytest.raises(ValueError, match="OddAttention: neither a head_dim nor a head count"):
        head_dim_of(attn, None)
    attn.head_dim = 4
    with pytest.raises(ValueError, match=r"OddAttention\.k_proj is not a linear projection"):
        separate_site(attn)
    with pytest.raises(ValueError, match=r"OddAttention\.o_proj is not a linear projection"):
        projection_dims(attn, "o_proj")
