"""A standalone SSA layer for people building their own models (nanoGPT-style, read top to bottom)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selective_attention.config import SSAConfig
from selective_attention.functional import apply_temperature, compute_dtype, document_positions, selective_attention
from selective_attention.temperature import SSATemperatures


@dataclass
class KVCache:
    """Keys (after RoPE) and values of the tokens seen so far, temperatures already applied: tau_k(x_j, p_j)
    and tau_v(x_j, p_j) depend on token j alone, so they are fixed once the token is cached."""

    k: Tensor | None = None  # (B, Hkv, T_past, D)
    v: Tensor | None = None  # (B, Hkv, T_past, D)

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotary embedding of x (B, H, T, D) at 0-indexed positions (T,) or (B, T)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    pos = positions.to(torch.float32)
    pos = pos[None] if pos.dim() == 1 else pos  # (B|1, T)
    freqs = pos[..., None] * inv_freq  # (B|1, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B|1, 1, T, D)
    xf = x.to(compute_dtype(x))
    return (xf * emb.cos().to(xf.dtype) + rotate_half(xf) * emb.sin().to(xf.dtype)).to(x.dtype)


class SelectiveSelfAttention(nn.Module):
    """Causal multi-head (GQA / MQA) self-attention with SSA temperatures.

    ``forward(x, positions=None, cache=None)``: x (B, T, d_model). ``positions`` are 1-indexed absolute
    positions (T,) or (B, T), default ``cache.length + 1 ... cache.length + T``; they drive both RoPE and the
    position term, so decoding token by token with a ``KVCache`` equals the full forward.

    Packed documents: ``forward(x, document_ids=ids)`` with ids (T,) or (B, T) lets each document attend only to
    itself, and positions (RoPE and p) restart at 1 in every document (pass ``positions`` too when a window
    starts inside a document: its first document then continues at its true position). For a stack of layers,
    build the mask once per batch, ``attn_mask=functional.document_mask(ids)``, and pass it with ``positions``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        config: SSAConfig | None = None,
        *,
        bias: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.config = config or SSAConfig()
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        if rope and self.head_dim % 2:
            raise ValueError("RoPE needs an even head dimension")
        self.rope, self.rope_base, self.dropout = rope, rope_base, dropout
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.temperature = SSATemperatures(d_model, n_heads, n_kv_heads, self.head_dim, self.config)

    def _split(self, t: Tensor, heads: int) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def _positions(self, x: Tensor, positions: Tensor | None, past: int) -> Tensor:
        T = x.shape[1]
        if positions is None:
            return torch.arange(past + 1, past + T + 1, device=x.device)
        positions = torch.as_tensor(positions, device=x.device)
        if positions.shape[-1] != T or positions.dim() not in (1, 2):
            raise ValueError(f"positions must have shape (T,) or (B, T) with T={T}, got {tuple(positions.shape)}")
        if not torch.compiler.is_compiling() and bool((positions < 1).any()):  # data-dependent: eager only
            raise ValueError("positions are 1-indexed: every position must be >= 1")
        return positions

    def _taus(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, p: Tensor) -> dict[str, Tensor | None]:
        inputs = {"query": q, "key": k, "value": v}
        return {t: self.temperature(t, projection=inputs[t], hidden=x, positions=p) for t in ("query", "key", "value")}

    def temperatures(
        self, x: Tensor, positions: Tensor | None = None, document_ids: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Query and value temperatures (B, H, T) for inspection (value heads repeated for GQA);
        a target without a temperature reports ones. ``document_ids``: positions restart in each document."""
        B, T, _ = x.shape
        if document_ids is not None and positions is None:
            positions = document_positions(document_ids.to(x.device))
        p = self._positions(x, positions, 0)
        q = self._split(self.q_proj(x), self.n_heads)
        k = self._split(self.k_proj(x), self.n_kv_heads)
        v = self._split(self.v_proj(x), self.n_kv_heads)
        taus = self._taus(x, q, k, v, p)
        out = {}
        for t in ("query", "key", "value"):
            tau = taus[t]
            if tau is None:
                tau = x.new_ones(B, self.n_heads, T, dtype=torch.float32)
            tau = tau.expand(B, -1, T)
            if tau.shape[1] != self.n_heads:
                tau = tau.repeat_interleave(self.n_heads // tau.shape[1], dim=1)
            out[t] = tau
        return out

    def forward(
        self,
        x: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, T, {self.d_model}), got {tuple(x.shape)}")
        past = 0 if cache is None else cache.length
        if document_ids is not None:
            if cache is not None:  # the cache would need every past token's document too
                raise ValueError("document_ids with a KVCache: decode each document with its own cache")
            if document_ids.shape[-1] != x.shape[1]:
                raise ValueError(
                    f"document_ids of shape {tuple(document_ids.shape)} do not cover the T={x.shape[1]} tokens"
                )
            if positions is None:
                positions = document_positions(document_ids.to(x.device))  # restarting at 1 in each document
        p = self._positions(x, positions, past)
        q = self._split(self.q_proj(x), self.n_heads)  # (B, H, T, hs), pre-RoPE
        k = self._split(self.k_proj(x), self.n_kv_heads)  # (B, Hkv, T, hs)
        v = self._split(self.v_proj(x), self.n_kv_heads)
        taus = self._taus(x, q, k, v, p)  # token term sees the projection before RoPE
        tau_k, tau_v = taus["key"], taus["value"]
        if cache is not None:  # the cache keeps scaled keys / values: tau_j is fixed once token j is cached
            k, v = apply_temperature(k, tau_k), apply_temperature(v, tau_v)
            tau_k = tau_v = None
        # else the fused op scales them: its backward recomputes the scaled copies instead of keeping them
        if self.rope:  # a per-token scalar commutes with the rotation: tau_k may act before or after it
            q = apply_rope(q, p - 1, self.rope_base)
            k = apply_rope(k, p - 1, self.rope_base)
        if cache is not None:
            k, v = cache.append(k, v)
        y = selective_attention(
            q,
            k,
            v,
            taus["query"],
            tau_v,
            tau_k,
            attn_mask=attn_mask,
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            document_ids=document_ids,
        )  # (B, H, T, hs)
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
