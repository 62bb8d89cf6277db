"""GPT-2: one fused ``c_attn`` (Conv1D) whose output is [q | k | v], each (B, T, C) with heads contiguous."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from selective_attention.hf.site import Site

if TYPE_CHECKING:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention


def _attention_modules(model: nn.Module) -> list[tuple[str, GPT2Attention]]:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, GPT2Attention) and not m.is_cross_attention]


def matches(model: nn.Module) -> bool:
    return bool(_attention_modules(model))


def sites(model: nn.Module) -> list[Site]:
    out = []
    for name, attn in _attention_modules(model):
        C, H, D = attn.embed_dim, attn.num_heads, attn.head_dim

        def split(t: Tensor, C: int = C, H: int = H, D: int = D) -> tuple[Tensor, Tensor, Tensor]:
            B, T = t.shape[:2]
            q, k, v = t.split(C, dim=2)
            return q.view(B, T, H, D), k.view(B, T, H, D), v.view(B, T, H, D)  # (B, T, nh, hs)

        def join(t: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=2)  # (B, T, 3C)

        out.append(Site(attn, H, H, D, C, fused="c_attn", split=split, join=join, name=name))
    return out
