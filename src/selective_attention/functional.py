"""The fused SSA op: temperatures are folded into q / k / v, then one ordinary SDPA call does the rest.

Because each temperature is a per-token scalar,  softmax(s <tau_q q_i, tau_k k_j>) (tau_v v_j)  equals SDPA on
(tau_q * q, tau_k * k, tau_v * v). No T x T matrix is built unless the caller passes an explicit mask.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs (temperatures are never applied in low precision), float64 stays;
    float32 for anything else (float8, integer or quantised storage)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for ``device``'s type: temperatures are computed in float32 (or float64) under any autocast
    (autocast would run their einsum / linear in bf16 and round tau to steps of 2^-7 around 1)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _scale(x: Tensor, tau: Tensor) -> Tensor:
    dt = compute_dtype(x)
    return (x.to(dt) * tau.to(dt).unsqueeze(-1)).to(x.dtype)


class _ScaleByTemperature(torch.autograd.Function):
    """x * tau with a backward that keeps only x and tau (no float32 copy of a bf16 x is saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, tau: Tensor) -> Tensor:
        ctx.save_for_backward(x, tau)
        return _scale(x, tau)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, tau = ctx.saved_tensors
        dt = compute_dtype(x)
        gx = _scale(grad, tau) if ctx.needs_input_grad[0] else None
        gtau = None
        if ctx.needs_input_grad[1]:
            gtau = (grad.to(dt) * x.to(dt)).sum(-1).sum_to_size(tau.shape).to(tau.dtype)
        return gx, gtau


def apply_temperature(x: Tensor, tau: Tensor | None) -> Tensor:
    """x (B, H, T, D) times tau (broadcastable to (B, H, T)), multiplied in float32 (or x's wider dtype),
    returned in x's dtype."""
    if tau is None:
        return x
    if torch.is_grad_enabled() and (x.requires_grad or tau.requires_grad):
        if torch.compiler.is_compiling():
            # a checkpointed region: the partitioner recomputes the product in backward instead of saving it
            return checkpoint(_scale, x, tau, use_reentrant=False)
        return _ScaleByTemperature.apply(x, tau)
    return _scale(x, tau)


def _recompute_scaled_inputs(scaled: list[tuple[Tensor, Tensor, Tensor]]):
    """Saved-tensor hooks that make the attention kernel save (x, tau) instead of its scaled copy x * tau, and
    recompute the product in backward: SSA then keeps no more activations than plain SDPA (x and tau are
    saved by the scaling anyway); the price is one elementwise product per input in backward.

    Holding x and tau directly would bypass autograd's check that saved tensors are not modified in place
    before backward (a KV cache slice written after the forward would silently corrupt dq): their version
    counters are recorded here and compared in backward, raising the same RuntimeError autograd raises."""

    # Identify the scaled copies by address only: holding them here (the hooks outlive forward) would keep
    # them alive until backward, the very cost this avoids.
    def address(t: Tensor) -> tuple:  # the layout too: a transposed alias of the same storage is another tensor
        return t.data_ptr(), t.shape, t.dtype, t.stride(), t.storage_offset()

    keys = [(address(s), x, tau) for s, x, tau in scaled]
    scaled.clear()

    def pack(t: Tensor):
        for key, x, tau in keys:
            if address(t) == key:
                return ("ssa-scaled", x, x._version, tau, tau._version)
        return t

    def unpack(p):
        if isinstance(p, tuple) and p[0] == "ssa-scaled":
            _, x, x_version, tau, tau_version = p
            for name, t, version in (("input", x, x_version), ("temperature", tau, tau_version)):
                if t._version != version:
                    raise RuntimeError(
                        f"one of the variables needed for gradient computation has been modified by an inplace "
                        f"operation: the SSA attention {name} of shape {tuple(t.shape)} is at version "
                        f"{t._version}; expected version {version} instead (it was changed in place between "
                        f"forward and backward, e.g. a KV cache written after the forward)")
            return _scale(x, tau)
        return p

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _check_tau(name: str, tau: Tensor | None, shape: tuple[int, int, int]) -> None:
    if tau is None:
        return
    if not isinstance(tau, Tensor):
        raise ValueError(f"{name} must be a tensor or None, got {type(tau).__name__}")
    try:
        torch.broadcast_shapes(tuple(tau.shape), shape)
        ok = tau.dim() <= 3 and torch.broadcast_shapes(tuple(tau.shape), shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(tau.shape)} does not broadcast to (B, H, T) = {shape}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, is_causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor (B, H, T, D), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch size or head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if is_causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={q.shape[2]} Tk={k.shape[2]}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def _merge_causal(attn_mask: Tensor, tq: int, tk: int) -> Tensor:
    """An explicit mask AND the bottom-right-aligned causal mask (query i sits at absolute position tk-tq+i)."""
    causal = torch.ones(tq, tk, dtype=torch.bool, device=attn_mask.device).tril(tk - tq)
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


def selective_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau_q: Tensor | None = None,
    tau_v: Tensor | None = None,
    tau_k: Tensor | None = None,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Selective self-attention, the SSA counterpart of ``F.scaled_dot_product_attention``.

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 (GQA / MQA); tau_q broadcastable to (B, H, Tq);
    tau_k, tau_v broadcastable to (B, Hkv, Tk). With ``is_causal`` and Tq < Tk (cached decoding) query i is at
    absolute position Tk - Tq + i. ``attn_mask`` (bool: True = attend, or additive float) broadcastable to
    (B, H, Tq, Tk) is combined with the causal mask. Returns (B, H, Tq, D) in q's dtype.
    """
    _check_inputs(q, k, v, dropout_p, is_causal)
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    _check_tau("tau_q", tau_q, (B, H, Tq))
    _check_tau("tau_k", tau_k, (B, Hkv, Tk))
    _check_tau("tau_v", tau_v, (B, Hkv, Tk))
    scaled: list[tuple[Tensor, Tensor, Tensor]] = []
    for name, x, tau in (("q", q, tau_q), ("k", k, tau_k), ("v", v, tau_v)):
        if tau is not None:
            s = apply_temperature(x, tau)
            scaled.append((s, x, tau))
            q, k, v = (s if name == "q" else q, s if name == "k" else k, s if name == "v" else v)
    causal_flag = False
    if is_causal:
        if attn_mask is not None:
            attn_mask = _merge_causal(attn_mask, Tq, Tk)
        elif Tq == Tk:
            causal_flag = True  # fused kernels mask internally: nothing materialised
        elif Tq > 1 and torch.compiler.is_compiling():
            # the lazy CausalBias subclass below cannot be built inside a graph: a (Tq, Tk) bool mask instead
            attn_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        elif Tq > 1:
            attn_mask = causal_lower_right(Tq, Tk)  # a lazy bias object, not a dense matrix
        # Tq == 1 < Tk: the single new query sees every cached key, no mask needed
    def attend() -> Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal_flag, scale=scale,
            enable_gqa=H != Hkv,
        )

    if torch.compiler.is_compiling() or not (scaled and torch.is_grad_enabled()):
        # Saved-tensor hooks cannot be traced: under torch.compile apply_temperature made the scaling a
        # checkpointed region instead, which the partitioner recomputes in backward.
        return attend()
    with _recompute_scaled_inputs(scaled):
        return attend()


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau_q: Tensor | None = None,
    tau_v: Tensor | None = None,
    tau_k: Tensor | None = None,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The naive, materialised form (the public code's): explicit logits, mask, softmax. Testing and benchmarks.

    Temperatures are applied where the formula puts them: tau_q and tau_k scale the logits, tau_v each value.
    """
    _check_inputs(q, k, v, 0.0, is_causal)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rep = H // Hkv
    k_full = k.repeat_interleave(rep, dim=1)
    v_full = v.repeat_interleave(rep, dim=1)
    s = 1.0 / math.sqrt(D) if scale is None else scale
    logits = s * (q @ k_full.transpose(-2, -1))  # (B, H, Tq, Tk)
    if tau_q is not None:
        logits = logits * tau_q.to(logits.dtype).expand(B, H, Tq).unsqueeze(-1)
    if tau_k is not None:
        logits = logits * tau_k.to(logits.dtype).expand(B, Hkv, Tk).repeat_interleave(rep, 1).unsqueeze(-2)
    if is_causal:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else logits + attn_mask
    weights = torch.softmax(logits, dim=-1)
    if tau_v is not None:
        v_full = v_full * tau_v.to(v.dtype).expand(B, Hkv, Tk).repeat_interleave(rep, 1).unsqueeze(-1)
    out = weights @ v_full
    return (out, weights) if return_weights else out
