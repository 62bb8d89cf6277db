"""Llama-style attention with separate ``q_proj`` / ``k_proj`` / ``v_proj`` (Llama, Mistral, Qwen2/3, Gemma,
Phi, OLMo, SmolLM, ...), GQA / MQA included: the head counts are read off the projection shapes."""

from __future__ import annotations

from torch import nn

from selective_attention.hf.adapters.common import has_separate_projections, separate_site
from selective_attention.hf.site import Site

# Attention classes known to work through this adapter (others go through the generic path).
KNOWN = (
    "LlamaAttention",
    "MistralAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "GemmaAttention",
    "Gemma2Attention",
    "OlmoAttention",
    "Olmo2Attention",
    "PhiAttention",
    "StableLmAttention",
    "GraniteAttention",
    "CohereAttention",
    "Starcoder2Attention",
)


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in KNOWN and has_separate_projections(m)]


def matches(model: nn.Module) -> bool:
    return bool(_attention_modules(model))


def sites(model: nn.Module) -> list[Site]:
    return [separate_site(m, n) for n, m in _attention_modules(model)]
