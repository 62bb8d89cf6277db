"""The query rules: temperature modules that replace SSA's query temperature (``attn.ssa_temperature.fns["query"]``)
so that every rule runs through the same fused attention path. Each returns tau (B|1, H, T) from the 1-indexed
positions (and, for ``freq``, the input ids)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from selective_attention.temperature import log_positions


class ConstantTemperature(nn.Module):
    """tau_h: one learned inverse temperature per head, the same for every token and position."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.tau = nn.Parameter(torch.ones(n_heads))

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        T = positions.shape[-1]
        return self.tau.float()[None, :, None].expand(1, -1, T)  # (1, H, T): the same for every token


class YarnTemperature(nn.Module):
    """Fixed 1 + coefficient * ln p (no parameters)."""

    def __init__(self, n_heads: int, coefficient: float = 0.1) -> None:
        super().__init__()
        self.n_heads, self.coefficient = n_heads, coefficient

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        logp = log_positions(positions)
        logp = logp[None] if logp.dim() == 1 else logp  # (B, T)
        return (1.0 + self.coefficient * logp)[:, None, :].expand(-1, self.n_heads, -1)


class ScalableSoftmaxTemperature(nn.Module):
    """Scalable-Softmax: logits times s_h ln n, n = keys visible to the query (= its position p)."""

    def __init__(self, n_heads: int, seq_len: int, s_init: float | None = None) -> None:
        super().__init__()
        self.n_heads = n_heads
        s0 = self.default_s(seq_len) if s_init is None else s_init
        self.s = nn.Parameter(torch.full((n_heads,), s0))

    @staticmethod
    def default_s(seq_len: int) -> float:
        """s_h log p = 1 at the training length: the paper's rescaled start."""
        return 1.0 / math.log(max(seq_len, 3))

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        logp = log_positions(positions)
        logp = logp[None] if logp.dim() == 1 else logp
        # p = 1 gives tau = 0: a single visible key gets weight 1 whatever the logit, so nothing is lost
        return self.s.float()[None, :, None] * logp[:, None, :]


class FrequencyTemperature(nn.Module):
    """Fixed tau(t) from the token's training-corpus frequency; needs the input ids (set by a model pre-hook).
    The table is a saved buffer, so a trained model reloads without the corpus."""

    table: Tensor

    def __init__(self, n_heads: int, table: Tensor) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.register_buffer("table", table.float().clone())  # (vocab,); a copy per layer (saved apart)
        self.input_ids: Tensor | None = None

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        if self.input_ids is None:
            raise RuntimeError("FrequencyTemperature: no input ids (attach it with install_rule)")
        return self.table[self.input_ids][:, None, :].expand(-1, self.n_heads, -1)  # (B, H, T)


class Llama4Temperature(nn.Module):
    """Llama 4's attention temperature tuning: tau = 1 + beta * ln(1 + floor(p / floor_scale)) (no parameters).

    Llama 4 uses beta = 0.1 and floor_scale = 8192 for contexts of 8k tokens and more (on its NoPE layers; here on
    every layer). At our training lengths 8192 would leave tau = 1 everywhere, so the default floor_scale scales
    with the training length: ``seq_len // 16`` (at least 1), i.e. tau steps up 16 times within one sequence
    (256 tokens: floor_scale 16, tau from 1 to 1 + 0.1 ln 17 = 1.28)."""

    def __init__(self, n_heads: int, beta: float = 0.1, floor_scale: int = 8192) -> None:
        super().__init__()
        self.n_heads, self.beta, self.floor_scale = n_heads, beta, floor_scale

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        p = positions.float()
        p = p[None] if p.dim() == 1 else p  # (B, T), 1-indexed
        tau = 1.0 + self.beta * torch.log1p(torch.floor(p / self.floor_scale))
        return tau[:, None, :].expand(-1, self.n_heads, -1)  # (B, H, T)


class OfficialPositionTemperature(nn.Module):
    """The official release's temperature: tau = 1 + c ln p on the query, c = exp(-exp(beta)), one beta per layer
    (shared by its heads). beta = 2.0 starts at c = exp(-e^2) = 6.2e-4, near identity; c stays in (0, 1)."""

    def __init__(self, n_heads: int, beta: float = 2.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.beta = nn.Parameter(torch.full((1,), float(beta)))

    def position_coefficient(self) -> Tensor:
        return torch.exp(-torch.exp(self.beta.float()))  # (1,)

    def coefficient_reach(self, start: Mapping[str, Tensor], step_bound: float) -> tuple[float, float] | None:
        """(c at the start, how far c could move) when beta moves at most ``step_bound`` either way from its start
        value ``start["beta"]`` (AdamW's bound: the sum of its learning rates); None without a start beta. c is
        monotone in beta, so the farthest c lies at an end of that interval."""
        if "beta" not in start:
            return None
        start_beta = float(start["beta"])
        c = [math.exp(-math.exp(b)) for b in (start_beta, start_beta - step_bound, start_beta + step_bound)]
        return c[0], max(c[1] - c[0], c[0] - c[2])

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        logp = log_positions(positions)
        logp = logp[None] if logp.dim() == 1 else logp  # (B, T)
        return (1.0 + self.position_coefficient()[:, None, None] * logp[:, None, :]).expand(-1, self.n_heads, -1)


def frequency_table(tokens: np.ndarray, vocab: int, lo: float = 0.25, hi: float = 4.0) -> Tensor:
    """-ln f(t) / H per token id, clamped to [lo, hi]; H = sum f ln(1/f) (so the corpus average is ~1)."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab).astype(np.float64) + 1.0
    f = counts / counts.sum()
    surprisal = -np.log(f)
    entropy = float((f * surprisal).sum())
    return torch.from_numpy(np.clip(surprisal / entropy, lo, hi)).float()


class _StashInputIds:
    """Model forward pre-hook: hand the input ids to every FrequencyTemperature."""

    def __init__(self, modules: list[FrequencyTemperature]) -> None:
        self.modules = modules

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        for m in self.modules:
            m.input_ids = ids
