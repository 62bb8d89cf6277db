"""What a training forward keeps for backward: SSA = vanilla + its temperatures, on the Hugging Face path and in the
standalone layer (issue 23).

Counted with saved-tensor hooks: the bytes of every distinct storage autograd saves, parameters excluded. The
bound, per attention layer, over vanilla's count:

- the tau tensors (B, H, T) and anything else of size O(B * H * T) (log p, tanh f, f): at most ``SMALL`` such
  float32 tensors;
- nothing of size B * H * T * D: no scaled copy tau * q / tau * v (the kernel keeps q / v as vanilla does and
  recomputes the product in backward) and none of the token term's intermediates (recomputed);
- the one exception, stated: the shared token term reads the query's projection *before* RoPE, which a RoPE model
  frees after the rotation; its backward needs that (B, H, T, D) input (``PRE_ROPE``: one per layer whose query
  has a token term and RoPE). Without RoPE (GPT-2) or without a token term there is no exception.

Eager attention (and SDPA with GQA under a mask, where transformers repeats k / v itself) keeps reshaped copies
of its inputs (matmul flattens (B, H, T, D), copying a non-contiguous query; ``repeat_kv``): SSA's kernel keeps
(x, tau) in place of a reshaped copy of a scaled input too. Two stated costs remain there: with GQA the repeated
copy of the values is the kernel's (vanilla keeps the same), and beside it the value temperature's backward
keeps v's projection (one (B, Hkv, T, D) per layer); GPT-2's token term reads views of c_attn's fused output,
which it keeps whole, where vanilla eager keeps only its copies of q / k / v.

Today's HF path failed this: a one-layer d 256 Llama at T 512 (B 2) saved vanilla 21.3 MiB, SSA query + value
24.4 MiB (q and tau * q, v and tau * v); now 22.4 MiB = vanilla + the pre-RoPE query + 64 KiB of temperatures.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selective_attention import hf
from selective_attention.config import SSAConfig
from selective_attention.layer import SelectiveSelfAttention, apply_rope

B, T, D_MODEL, HEADS = 2, 512, 256, 4
BHT = B * HEADS * T * 4  # one float32 (B, H, T) tensor, bytes
BHTD = BHT * (D_MODEL // HEADS)  # one float32 (B, H, T, D) tensor, bytes
SMALL = 8  # O(B * H * T) tensors allowed per layer (taus and the terms they are summed from)
PRE_ROPE = BHTD  # one layer's query projection before RoPE (the token term's input)


def saved_bytes(model: nn.Module, forward) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during ``forward()``."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def _llama(config: SSAConfig | None, layers: int = 1, kv_heads: int = HEADS, attn: str = "sdpa") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=D_MODEL,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        max_position_embeddings=T,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg)
    return (model if config is None else hf.convert(model, config)).train()


def _gpt2(config: SSAConfig | None, attn: str = "sdpa") -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=256,
            n_positions=T,
            n_embd=D_MODEL,
            n_layer=1,
            n_head=HEADS,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_implementation=attn,
        )
    )
    return (model if config is None else hf.convert(model, config)).train()


def _extra(build, config: SSAConfig, **kwargs) -> int:
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    vanilla, ssa = build(None), build(config)
    base = saved_bytes(vanilla, lambda: vanilla(x, **kwargs).logits)
    return saved_bytes(ssa, lambda: ssa(x, **kwargs).logits) - base


def test_hf_llama_keeps_vanilla_plus_temperatures():
    # query + value, token and position terms (the study's default): the KV cache's copy of v (use_cache on by
    # default in training) and the packed path's view of it (use_cache=False) alike
    for kwargs in ({}, {"use_cache": False}):
        extra = _extra(_llama, SSAConfig(), **kwargs)
        assert 0 < extra <= PRE_ROPE + SMALL * BHT, (kwargs, extra / 2**20)
    # without the token term nothing of size B * H * T * D is kept beyond vanilla's
    extra = _extra(_llama, SSAConfig(token_aware=False, value=False))
    assert 0 < extra <= SMALL * BHT, extra / 2**20


@pytest.mark.parametrize("kwargs", [{}, {"use_cache": False}], ids=["cache", "no-cache"])
@pytest.mark.parametrize("config", [SSAConfig(), SSAConfig(key=True)], ids=["query+value", "query+key+value"])
def test_hf_gpt2_keeps_vanilla_plus_temperatures(kwargs, config):
    # A fused qkv projection (c_attn): the hooks rejoin q, tau_k k, tau_v v into a new (B, T, 3 d) tensor; the
    # attention keeps views of c_attn's own output instead (it held a qkv-sized copy more than vanilla, 3 MiB
    # here, before). No RoPE: the token term's input is the query the attention keeps anyway.
    extra = _extra(_gpt2, config, **kwargs)
    assert 0 < extra <= SMALL * BHT, extra / 2**20


def test_hf_gpt2_eager_keeps_at_most_the_fused_projection_more():
    # eager: vanilla keeps matmul's copies of q / k / v, not c_attn's output, which SSA's token term keeps
    # (6 MiB more than vanilla before: the rejoined copy and the scaled copies of q and v)
    for kwargs in ({}, {"use_cache": False}):
        extra = _extra(lambda c: _gpt2(c, attn="eager"), SSAConfig(), **kwargs)
        assert 0 < extra <= 3 * BHTD + SMALL * BHT, (kwargs, extra / 2**20)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [HEADS, 2])
def test_hf_llama_with_gqa_and_a_mask_keeps_no_repeated_or_scaled_copy(attn, kv_heads):
    # Left padding (a 4-d mask): eager attention, and SDPA with GQA, run on k / v repeated by transformers and
    # copy the query in matmul; none of those copies is kept for a scaled input beyond what vanilla keeps (eager
    # kept the rotated query and a copy of the scaled values more before: 2 MiB here). With GQA the value
    # temperature's input (v's projection) is kept beside the kernel's repeated copy of the values, which
    # vanilla keeps as well.
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :37] = 0
    values = BHTD * kv_heads // HEADS if kv_heads < HEADS else 0
    build = lambda c: _llama(c, kv_heads=kv_heads, attn=attn)  # noqa: E731
    extra = _extra(build, SSAConfig(), attention_mask=mask)
    assert 0 < extra <= PRE_ROPE + values + SMALL * BHT, extra / 2**20
    extra = _extra(build, SSAConfig(token_aware=False, value=False), attention_mask=mask)
    assert 0 < extra <= SMALL * BHT, extra / 2**20


def _vanilla_layer(layer: SelectiveSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The same layer's weights without temperatures: plain SDPA."""
    p = torch.arange(1, x.shape[1] + 1)
    q = layer._split(layer.q_proj(x), layer.n_heads)  # (B, nh, T, hs)
    k = layer._split(layer.k_proj(x), layer.n_kv_heads)
    v = layer._split(layer.v_proj(x), layer.n_kv_heads)
    if layer.rope:
        q, k = apply_rope(q, p - 1, layer.rope_base), apply_rope(k, p - 1, layer.rope_base)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return layer.o_proj(y.transpose(1, 2).reshape(x.shape))


def test_layer_keeps_vanilla_plus_temperatures():
    g = torch.Generator().manual_seed(0)
    for rope in (False, True):
        torch.manual_seed(0)
        layer = SelectiveSelfAttention(D_MODEL, HEADS, config=SSAConfig(), rope=rope)
        x = torch.randn(B, T, D_MODEL, generator=g, requires_grad=True)
        ssa = saved_bytes(layer, lambda m=layer, x=x: m(x))
        extra = ssa - saved_bytes(layer, lambda m=layer, x=x: _vanilla_layer(m, x))
        assert 0 < extra <= (PRE_ROPE if rope else 0) + SMALL * BHT, (rope, extra / 2**20)
