"""GPT-NeoX (Pythia): fused ``query_key_value`` whose output is per head [q_h | k_h | v_h] (B, T, nh, 3 * hs);
partial rotary is applied later, and a per-token scalar commutes with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from selective_attention.hf.adapters.common import projection_dims
from selective_attention.hf.site import Site

if TYPE_CHECKING:
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention


def _attention_modules(model: nn.Module) -> list[tuple[str, GPTNeoXAttention]]:
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention

    return [(n, m) for n, m in model.named_modules() if isinstance(m, GPTNeoXAttention)]


def matches(model: nn.Module) -> bool:
    return bool(_attention_modules(model))


def sites(model: nn.Module) -> list[Site]:
    out = []
    for name, attn in _attention_modules(model):
        D: int = attn.head_size
        C, n_out = projection_dims(attn, "query_key_value")
        H = n_out // (3 * D)

        def split(t: Tensor, H: int = H, D: int = D) -> tuple[Tensor, Tensor, Tensor]:
            B, T = t.shape[:2]
            q, k, v = t.view(B, T, H, 3 * D).split(D, dim=-1)  # (B, T, nh, hs) each
            return q, k, v

        def join(t: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return torch.cat([q, k, v], dim=-1).reshape(t.shape)

        out.append(Site(attn, H, H, D, C, fused="query_key_value", split=split, join=join, name=name))
    return out
