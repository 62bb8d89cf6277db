"""A tiny decoder-only LM built from the library's ``SelectiveSelfAttention`` for the dilution / passkey experiments.

``vanilla`` is the same model with every temperature parameter frozen at the identity initialisation
(u = 0 and c = 0 exactly, so tau = 1 for every token): one code path, and the only difference is SSA.
The forward takes ``input_ids`` and returns logits, so ``train.loop.fit`` trains it like any other LM;
``optim_config`` is the experiments' optimizer (AdamW, temperatures at 10x lr, no decay, no clipping).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from selective_attention.config import SSAConfig
from selective_attention.functional import reference_attention
from selective_attention.layer import SelectiveSelfAttention, apply_rope
from selective_attention.temperature import temperature_parameters
from selective_attention.train.optim import OptimConfig


def ssa_config(method: str, token_aware: bool = True) -> SSAConfig:
    """vanilla: identity-initialised temperatures (frozen by ``TinyLM``); ssa: query temperature with the
    position term (and the token term if ``token_aware``), trained from scratch (c starts at sigmoid(0) = 0.5)."""
    if method == "vanilla":
        return SSAConfig(query=True, value=False, init="identity")
    if method == "ssa":
        return SSAConfig(query=True, value=False, token_aware=token_aware, position_aware=True, init="scratch")
    raise ValueError(f"unknown method {method!r}")


class Block(nn.Module):
    def __init__(self, d: int, n_heads: int, config: SSAConfig, rope: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelectiveSelfAttention(d, n_heads, config=config, rope=rope)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(
        self, vocab: int, d: int, n_layers: int, n_heads: int, method: str, rope: bool = True, token_aware: bool = True
    ) -> None:
        super().__init__()
        self.method = method
        config = ssa_config(method, token_aware)
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, n_heads, config, rope) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(d))
        if method == "vanilla":
            for p in temperature_parameters(self):
                p.requires_grad_(False)

    def forward(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)

    @torch.no_grad()
    def attention_maps(self, idx: Tensor) -> list[Tensor]:
        """Attention weights per layer, each (B, H, T, T), recomputed from the layer's own projections and
        temperatures with the materialised ``reference_attention`` (tests check it matches the fused forward)."""
        maps = []
        x = self.embed(idx)
        for block in self.blocks:
            assert isinstance(block, Block)  # a ModuleList yields plain Modules to the type checker
            maps.append(layer_weights(block.attn, block.ln1(x)))
            x = block(x)
        return maps


def optim_config(lr: float) -> OptimConfig:
    """AdamW (torch's default betas), temperatures at 10x ``lr``, no weight decay, no gradient clipping."""
    return OptimConfig(lr=lr, temperature_lr=10 * lr, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, clip=None)


def layer_weights(attn: SelectiveSelfAttention, x: Tensor) -> Tensor:
    """(B, H, T, T) attention weights of ``attn`` on x (B, T, d), positions 1..T, no cache."""
    B, T, _ = x.shape
    p = torch.arange(1, T + 1, device=x.device)
    q = attn._split(attn.q_proj(x), attn.n_heads)  # (B, H, T, hs) pre-RoPE
    k = attn._split(attn.k_proj(x), attn.n_kv_heads)
    v = attn._split(attn.v_proj(x), attn.n_kv_heads)
    tau_q = attn.temperature("query", projection=q, hidden=x, positions=p)
    tau_k = attn.temperature("key", projection=k, hidden=x, positions=p)
    if attn.rope:
        q, k = apply_rope(q, p - 1, attn.rope_base), apply_rope(k, p - 1, attn.rope_base)
    _, w = reference_attention(q, k, v, tau_q=tau_q, tau_k=tau_k, is_causal=True, return_weights=True)
    return w
