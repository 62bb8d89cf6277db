"""Gated attention (Qiu et al., 2025), headwise: each head's output times a gate from the attention's input,
before the output projection; installed with forward pre-hooks on the attention module and its ``o_proj``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from selective_attention.errors import UserError


class HeadGate(nn.Module):
    """Headwise output gate g = scale * sigmoid(x W_g), W_g: d_model -> n_heads, from the attention's input x.

    Init: W_g = 0 and scale = 2, so g = 2 * sigmoid(0) = 1 exactly: the model starts as the vanilla function,
    while dL/dW_g = scale * sigmoid'(0) * x * dL/dg = 0.5 * x * dL/dg is non-zero. The gate can still close
    (g -> 0, the paper's sparse gating) and open up to 2. ``scale=1`` gives the paper's plain sigmoid gate
    (g = 0.5 at this init)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, scale: float = 2.0) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.scale = n_heads, head_dim, scale
        self.proj = nn.Linear(d_model, n_heads, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.x: Tensor | None = None  # (B, T, d_model), set by the attention's pre-hook; never in the state dict

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * torch.sigmoid(self.proj(x))  # (B, T, H)


class _CaptureGateInput:
    """Forward pre-hook on the attention module: remember its input hidden state for the gate."""

    def __init__(self, gate: HeadGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(x, Tensor):
            raise ValueError(f"gated attention: cannot find the hidden state passed to {type(module).__name__}")
        self.gate.x = x


class _ApplyGate:
    """Forward pre-hook on o_proj: multiply each head's output (B, T, H * D) by its gate (B, T, H)."""

    def __init__(self, gate: HeadGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        gate, x = self.gate, self.gate.x
        if x is None:
            raise RuntimeError("gated attention: o_proj ran outside its attention module's forward")
        self.gate.x = None
        out = args[0]  # (B, T, H * D)
        B, T = out.shape[:2]
        g = gate(x).to(out.dtype)  # (B, T, H)
        out = (out.view(B, T, gate.n_heads, gate.head_dim) * g[..., None]).view(out.shape)
        return (out, *args[1:])


def install_gates(model: nn.Module, scale: float = 2.0) -> list[HeadGate]:
    """Add a HeadGate (submodule ``attn_gate``) to every Llama-style attention (one with ``o_proj``)."""
    from selective_attention.hf.convert import find_sites

    try:
        sites = find_sites(model)
    except ValueError as e:
        raise UserError(f"gated attention: {e}") from None
    missing = [type(s.attn).__name__ for s in sites if not isinstance(getattr(s.attn, "o_proj", None), nn.Module)]
    if missing:
        raise UserError(
            f"gated attention needs Llama-style attention modules with o_proj; {missing[0]} has none "
            f"(model {type(model).__name__})"
        )
    gates = []
    for s in sites:
        ref = next(s.attn.parameters())
        gate = HeadGate(s.d_model, s.n_heads, s.head_dim, scale).to(device=ref.device, dtype=ref.dtype)
        s.attn.add_module("attn_gate", gate)
        s.attn.register_forward_pre_hook(_CaptureGateInput(gate), with_kwargs=True)
        s.attn.get_submodule("o_proj").register_forward_pre_hook(_ApplyGate(gate))
        gates.append(gate)
    return gates
