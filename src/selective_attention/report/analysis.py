"""Model probes for the report: attention dilution curves and per-token temperatures.

Both work on any causal LM whose attention ends in ``torch.nn.functional.scaled_dot_product_attention``
(the SSA adapter folds tau_q / tau_v into q / v before that call, transformers' "sdpa" path calls it too):
``capture_attention`` records the q, k and mask of every call and rebuilds the attention probabilities, so the
same code measures vanilla and SSA models without knowing how either is wired.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


@contextlib.contextmanager
def capture_attention(rows: list[Tensor]) -> Iterator[None]:
    """Within the block, every SDPA call appends its attention probabilities (B, H, Tq, Tk) (float32, CPU) to
    ``rows`` and still returns the real kernel's output."""
    real = F.scaled_dot_product_attention

    def probe(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, **kw):
        out = real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                   enable_gqa=enable_gqa, **kw)
        rows.append(_probabilities(q, k, attn_mask, is_causal, scale))
        return out

    F.scaled_dot_product_attention = probe
    torch.nn.functional.scaled_dot_product_attention = probe
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real
        torch.nn.functional.scaled_dot_product_attention = real


@torch.no_grad()
def _probabilities(q: Tensor, k: Tensor, attn_mask, is_causal: bool, scale: float | None) -> Tensor:
    """softmax(scale * q k^T + mask) exactly as SDPA defines it, materialised in float32."""
    q, k = q.float(), k.float()
    H, Hk = q.shape[-3], k.shape[-3]
    if Hk != H:  # GQA: repeat the key heads
        k = k.repeat_interleave(H // Hk, dim=-3)
    Tq, Tk = q.shape[-2], k.shape[-2]
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = s * (q @ k.transpose(-2, -1))  # (B, H, Tq, Tk)
    if is_causal:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()  # SDPA's is_causal: top-left
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):  # a lazy causal-bias object (torch.nn.attention.bias)
            causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
            logits = logits.masked_fill(~causal, float("-inf"))
        elif attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).cpu()


def row_statistics(weights: Tensor) -> dict[str, Tensor]:
    """Per query position: entropy (nats) and max weight of each row, averaged over everything but the query
    axis. weights (..., Tq, Tk) -> {"entropy": (Tq,), "max_weight": (Tq,)}."""
    w = weights.float()
    ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1)  # (..., Tq)
    mx = w.amax(-1)
    dims = tuple(range(w.dim() - 2))
    return {"entropy": ent.mean(dims), "max_weight": mx.mean(dims)}


@torch.no_grad()
def dilution_curves(model, input_ids: Tensor) -> dict[str, list[float]] | None:
    """Mean attention entropy and max weight per query position (1-indexed), averaged over layers, heads and
    the batch. None when the model's attention never reaches SDPA (e.g. an eager-only implementation)."""
    rows: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with capture_attention(rows):
            model(input_ids=input_ids)
    finally:
        model.train(was_training)
    rows = [r for r in rows if r.shape[-2] == r.shape[-1] == input_ids.shape[1]]
    if not rows:
        return None
    stats = [row_statistics(r) for r in rows]
    ent = torch.stack([s["entropy"] for s in stats]).mean(0)
    mx = torch.stack([s["max_weight"] for s in stats]).mean(0)
    T = input_ids.shape[1]
    return {"position": list(range(1, T + 1)), "entropy": ent.tolist(), "max_weight": mx.tolist(),
            "uniform_entropy": [math.log(p) for p in range(1, T + 1)]}


@torch.no_grad()
def token_temperatures(model, tokenizer, text: str, target: str = "query", layer: int | str = "mean",
                       max_tokens: int = 256) -> dict:
    """Per-token temperature over ``text``: {"tokens": [str], "values": [float], "layer": ..., "target": ...,
    "per_layer": [[float]] (L, T)}; values are averaged over heads (and over layers for ``layer="mean"``).
    None values when the model has no SSA temperatures (a vanilla model: tau = 1 everywhere)."""
    from selective_attention.hf import model_temperatures

    if target not in ("query", "value"):
        raise ValueError(f"target must be 'query' or 'value', got {target!r}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
    if ids.shape[1] == 0:
        raise ValueError("the text has no tokens")
    taus = model_temperatures(model, ids)[target].float()  # (L, B, H, T)
    per_layer = taus[:, 0].mean(1)  # (L, T)
    L = per_layer.shape[0]
    if layer == "mean":
        values = per_layer.mean(0)
    else:
        li = int(layer)
        if not -L <= li < L:
            raise ValueError(f"layer {li} out of range: the model has {L} layers")
        values = per_layer[li]
    tokens = [tokenizer.decode([int(t)]) for t in ids[0]]
    return {"tokens": tokens, "values": values.tolist(), "per_layer": per_layer.tolist(), "layer": layer,
            "target": target, "n_layers": L}
