"""Any other family whose attention calls the ``transformers`` AttentionInterface (``_supports_attention_backend``)
and projects with separate ``q_proj`` / ``k_proj`` / ``v_proj`` or a fused ``qkv_proj`` laid out [q | k | v]
(Phi-3 style)."""

from __future__ import annotations

from torch import Tensor, nn

from selective_attention.hf.convert import Site
from selective_attention.hf.llama import has_separate_projections, separate_site


def _uses_interface(m: nn.Module) -> bool:
    import sys

    return hasattr(sys.modules[type(m).__module__], "ALL_ATTENTION_FUNCTIONS")


def _is_self_attention(m: nn.Module) -> bool:
    return getattr(m, "is_causal", True) and not getattr(m, "is_cross_attention", False)


def _fused_site(attn: nn.Module) -> Site:
    cfg = attn.config
    D = int(getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    H = cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    proj: nn.Linear = attn.qkv_proj
    if proj.out_features != (H + 2 * Hkv) * D:
        raise ValueError(f"{type(attn).__name__}: qkv_proj does not split into [q | k | v] heads")

    def split(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T = t.shape[:2]
        q, k, v = t.split([H * D, Hkv * D, Hkv * D], dim=-1)
        return q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)

    def join(t: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        import torch

        return torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)

    return Site(attn, H, Hkv, D, proj.in_features, fused=proj, split=split, join=join)


def _candidates(model: nn.Module) -> list[nn.Module]:
    out = []
    for m in model.modules():
        if not (_uses_interface(m) and _is_self_attention(m) and type(m).__name__.endswith("Attention")):
            continue
        if has_separate_projections(m) or isinstance(getattr(m, "qkv_proj", None), nn.Linear):
            out.append(m)
    return out


def matches(model: nn.Module) -> bool:
    return bool(getattr(model, "_supports_attention_backend", False)) and bool(_candidates(model))


def sites(model: nn.Module) -> list[Site]:
    return [separate_site(m) if has_separate_projections(m) else _fused_site(m) for m in _candidates(model)]
