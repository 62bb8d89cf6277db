"""Llama-style attention with separate ``q_proj`` / ``k_proj`` / ``v_proj`` (Llama, Mistral, Qwen2/3, Gemma,
Phi, OLMo, SmolLM, ...), GQA / MQA included: the head counts are read off the projection shapes."""

from __future__ import annotations

from torch import nn

from selective_attention.hf.convert import Site

# Attention classes known to work through this adapter (others go through the generic path).
KNOWN = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention", "GemmaAttention",
         "Gemma2Attention", "OlmoAttention", "Olmo2Attention", "PhiAttention", "StableLmAttention",
         "GraniteAttention", "CohereAttention", "Starcoder2Attention")


def has_separate_projections(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj"))


def head_dim_of(attn: nn.Module, fallback_heads: int | None) -> int:
    D = getattr(attn, "head_dim", None)
    if D is None:
        cfg = getattr(attn, "config", None)
        D = getattr(cfg, "head_dim", None) or attn.q_proj.out_features // fallback_heads
    return int(D)


def separate_site(attn: nn.Module) -> Site:
    cfg = getattr(attn, "config", None)
    D = head_dim_of(attn, getattr(cfg, "num_attention_heads", None))
    H, Hkv = attn.q_proj.out_features // D, attn.k_proj.out_features // D
    if H * D != attn.q_proj.out_features or Hkv * D != attn.v_proj.out_features:
        raise ValueError(f"{type(attn).__name__}: projections do not split into heads of size {D}")
    return Site(attn, H, Hkv, D, attn.q_proj.in_features,
                separate={"query": attn.q_proj, "key": attn.k_proj, "value": attn.v_proj})


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in KNOWN and has_separate_projections(m)]


def matches(model: nn.Module) -> bool:
    return bool(_attention_modules(model))


def sites(model: nn.Module) -> list[Site]:
    return [separate_site(m) for m in _attention_modules(model)]
