"""Any other family whose attention calls the ``transformers`` AttentionInterface (``_supports_attention_backend``)
and projects with separate ``q_proj`` / ``k_proj`` / ``v_proj`` (KV-sharing layers with ``q_proj`` only included)
or a fused ``qkv_proj`` laid out [q | k | v] (Phi-3 style)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from selective_attention.hf.adapters.common import (
    has_separate_projections,
    is_kv_shared,
    linear_dims,
    projection_dims,
    separate_site,
)
from selective_attention.hf.site import Site

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _uses_interface(m: nn.Module) -> bool:
    return hasattr(sys.modules[type(m).__module__], "ALL_ATTENTION_FUNCTIONS")


def _is_self_attention(m: nn.Module) -> bool:
    return getattr(m, "is_causal", True) and not getattr(m, "is_cross_attention", False)


def _fused_site(attn: nn.Module, name: str) -> Site:
    cfg = cast("PretrainedConfig", attn.config)
    D = int(getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    H: int = cfg.num_attention_heads
    Hkv: int = getattr(cfg, "num_key_value_heads", None) or H
    d_in, d_out = projection_dims(attn, "qkv_proj")
    if d_out != (H + 2 * Hkv) * D:
        raise ValueError(f"{type(attn).__name__}: qkv_proj does not split into [q | k | v] heads")

    def split(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T = t.shape[:2]
        q, k, v = t.split([H * D, Hkv * D, Hkv * D], dim=-1)
        return q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)

    def join(t: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)

    return Site(attn, H, Hkv, D, d_in, fused="qkv_proj", split=split, join=join, name=name)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for n, m in model.named_modules():
        if not (_uses_interface(m) and _is_self_attention(m) and type(m).__name__.endswith("Attention")):
            continue
        if has_separate_projections(m) or is_kv_shared(m) or linear_dims(getattr(m, "qkv_proj", None)):
            out.append((n, m))
    return out


def matches(model: nn.Module) -> bool:
    return bool(getattr(model, "_supports_attention_backend", False)) and bool(_candidates(model))


def sites(model: nn.Module) -> list[Site]:
    return [separate_site(m, n) if hasattr(m, "q_proj") else _fused_site(m, n) for n, m in _candidates(model)]
