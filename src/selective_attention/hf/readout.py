"""Parameter counts and the temperature read-out of converted models."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from selective_attention.hf.state import converted_attention_modules, is_converted, ssa_state
from selective_attention.temperature import temperature_parameters


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """{"base", "new", "total", "percent"}: parameters of the original model, added by SSA, and new / base in %."""
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    new = sum(p.numel() for p in temperature_parameters(model))
    base = total - new
    return {"base": base, "new": new, "total": total, "percent": 100.0 * new / base if base else 0.0}


@torch.no_grad()
def model_temperatures(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Per-layer query and value temperatures {"query": (L, B, H, T), "value": (L, B, H, T)} in float32 for one
    forward pass (value heads repeated for GQA; a target without a temperature reports ones). Positions follow
    the attention mask (left padding), as in ``generate``."""
    if not is_converted(model):
        raise ValueError(f"{type(model).__name__} is not SSA-converted")
    states = [ssa_state(a) for a in converted_attention_modules(model)]
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    for st in states:
        st.record = []
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        records = [st.record for st in states]
    finally:
        for st in states:
            st.record = None
    B, T = input_ids.shape
    out: dict[str, Tensor] = {}
    for target in ("query", "value"):
        layers = []
        for st, rec in zip(states, records):
            H = st.n_heads
            tau = rec[-1].get(target) if rec else None
            if tau is None:
                tau = torch.ones(B, H, T)
            tau = tau.float().cpu().expand(B, -1, T)
            if tau.shape[1] != H:
                tau = tau.repeat_interleave(H // tau.shape[1], dim=1)
            layers.append(tau)
        out[target] = torch.stack(layers)  # (L, B, H, T)
    return out
