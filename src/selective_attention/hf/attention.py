"""The attention functions that apply tau_q, registered with ``transformers`` by ``register()`` (idempotent;
``convert`` and ``from_pretrained`` call it, importing this module registers nothing).

``"ssa"`` runs the SDPA kernel and ``"ssa_eager"`` the family's eager kernel on q * tau_q (after RoPE and any
q-norm) and the key / value that already carry their temperatures; the mask is the one
``AttentionMaskInterface`` builds for the base kernel. No T x T matrix is added: the SDPA path stays fused.

Packed sequences (``position_ids`` that restart inside a row, as ``DataCollatorWithFlattening`` makes them): the
temperatures follow those positions (hooks.py), and transformers builds the document mask itself for sdpa and
eager when the model is called without a cache and without a 2-D ``attention_mask``. Otherwise its mask is plain
causal and documents would see each other: that forward is refused (``check_documents_apart``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from selective_attention.errors import UserError
from selective_attention.functional import apply_temperature, recomputing
from selective_attention.hf.hooks import take_joined
from selective_attention.hf.state import STATE_ATTR

SSA_SDPA, SSA_EAGER = "ssa", "ssa_eager"
BACKENDS = {"sdpa": SSA_SDPA, "eager": SSA_EAGER}  # the base kernel -> the SSA function running it
_registered = False


def eager_kernel(module: nn.Module) -> Callable:
    """The eager attention function of ``module``'s family; ValueError when it has none."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward: use the sdpa backend")
    return fn


# autograd nodes that only move data: a key / value reaching the kernel through these from its scaling is that
# product (views, the (B, T, H, D) -> (B, H, T, D) transpose, a KV cache's concatenation onto a gradient-free past)
_MOVES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "TransposeBackward0", "CatBackward0"})


def _moved_from(t: Tensor, node: Any, depth: int = 8) -> bool:
    """Whether ``t`` is the output of autograd node ``node`` moved by ``_MOVES`` alone, along one path."""
    fn = t.grad_fn
    for _ in range(depth):
        if fn is node:
            return True
        if fn is None or fn.name() not in _MOVES:
            return False
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:  # a cached past that carries a gradient: not the product alone
            return False
        fn = inputs[0]
    return False


def _scaled_inputs(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor | None]]]:
    """query times tau_q, and the (s, x, tau) of every kernel input that is a scaled product, for
    ``functional.recomputing``: the kernel then keeps q / k / v as vanilla does, not tau * q / k / v beside them.
    A key or value counts when it is the hooks' product itself or a same-shaped copy of it (the KV cache
    concatenates onto an empty past): one that went through anything else (RoPE on a scaled key) is kept as is.

    A fused projection (GPT-2's c_attn): q / k / v arrive as views of the hooks' rejoined output, a copy of the
    projection's. A key / value view there is the product at x's place; the query there holds the projection's
    own values, so its scaling and the kernel keep that view of the projection output instead (tau None in
    ``recomputing``): nothing keeps the rejoined copy, and SSA saves what vanilla saves."""
    st = getattr(module, STATE_ATTR, None)
    scaled: list[tuple[Tensor, Tensor, Tensor | None]] = []
    if st is None:
        return query, scaled
    joined = take_joined(st)
    for target, t in (("key", key), ("value", value)):
        rec = st.scaled.pop(target, None)
        if rec is not None and t.shape == rec[1].shape and t.dtype == rec[1].dtype and _moved_from(t, rec[0]):
            scaled.append((t, rec[1], rec[2]))
        elif joined is not None and joined.place(t, joined.views[target][0]):
            scaled.append((t, *joined.views[target]))  # scaled in place of x, or x's values unchanged
    if st.tau_q is None:
        return query, scaled
    tau, st.tau_q = st.tau_q, None
    if tau.shape[-1] != query.shape[2]:
        raise RuntimeError(f"SSA: tau_q covers {tau.shape[-1]} tokens but the query has {query.shape[2]}")
    source = query
    if joined is not None and joined.place(query, joined.views["query"][0]):
        source = joined.views["query"][0]  # the same values, in the projection's output
        with recomputing([(query, source, None)]):
            q = apply_temperature(query, tau)  # (B, H, T, D) * (B|1, H, T), keeping source for backward
    else:
        q = apply_temperature(query, tau)
    scaled.append((q, source, tau))
    return q, scaled


PACKED_HINT = (
    "call the model with use_cache=False and no attention_mask (transformers then builds the packed "
    "documents' mask from position_ids for sdpa and eager)"
)


def check_documents_apart(module: nn.Module, query: Tensor, key: Tensor, attention_mask: Tensor | None) -> None:
    """Refuse a forward whose position_ids restart inside a row (packed documents) while the mask lets a document
    see the one before it: SSA's p would restart but the attention would not. Checks the key just before each
    document's first token (O(documents), no T x T work); skipped under torch.compile (data-dependent)."""
    st = getattr(module, STATE_ATTR, None)
    pos = None if st is None else st.positions  # (B|1, T) 1-indexed
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    if (
        pos is None
        or not getattr(st, "positions_given", True)
        or Tq < 2
        or pos.shape[-1] != Tq
        or torch.compiler.is_compiling()
    ):
        return  # positions the hooks counted themselves never restart
    # p == 1 after the first token: a sequence begins there (left padding's pads sit at p = 2, not 1)
    rows, cols = torch.nonzero(pos.expand(B, -1)[:, 1:] == 1, as_tuple=True)  # (n,) each
    if rows.numel() == 0:
        return
    cols = cols + 1
    if attention_mask is None:  # the kernel's plain causal mask: every document sees the ones before it
        leaks = torch.ones_like(rows, dtype=torch.bool)
    elif not isinstance(attention_mask, Tensor):  # a BlockMask (flex): not ours to read, sdpa / eager only
        return
    else:
        m = (
            attention_mask.reshape(-1, *attention_mask.shape[-2:])
            if attention_mask.dim() != 4
            else attention_mask[:, 0]
        )  # (B|1, Tq, Tk): one mask for every head
        r, kv = rows if m.shape[0] > 1 else torch.zeros_like(rows), Tk - Tq + cols  # kv: the key of query cols
        seen = m[r, cols, kv - 1], m[r, cols, kv]  # the key before it, and itself (blocked: a padding query)
        before, itself = (t if t.dtype == torch.bool else t > -1e4 for t in seen)  # additive: blocked ~finfo.min
        leaks = before & itself
    if bool(leaks.any()):
        i = int(torch.nonzero(leaks)[0])
        raise UserError(
            f"SSA: position_ids restart at token {int(cols[i])} of row {int(rows[i])} (packed "
            f"documents), but the attention mask lets it see the document before it: {PACKED_HINT}"
        )


def ssa_sdpa_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    """q/k/v (B, H, T, D) after RoPE and the cache update; v (and k) already carry their temperatures."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    check_documents_apart(module, query, key, attention_mask)
    query, scaled = _scaled_inputs(module, query, key, value)
    with recomputing(scaled):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def ssa_eager_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any
) -> tuple[Tensor, Tensor | None]:
    check_documents_apart(module, query, key, attention_mask)
    query, scaled = _scaled_inputs(module, query, key, value)
    with recomputing(scaled):
        if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's float32 path, taken under "eager" only
            upcast_attention = cast(Callable[..., tuple[Tensor, Tensor | None]], module._upcast_and_reordered_attn)
            return upcast_attention(query, key, value, attention_mask)
        return eager_kernel(module)(module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Make "ssa" / "ssa_eager" known to transformers (attention function and mask builder). Idempotent."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask, sdpa_mask

    AttentionInterface.register(SSA_SDPA, ssa_sdpa_attention)
    AttentionMaskInterface.register(SSA_SDPA, sdpa_mask)  # without it the mask would arrive as None
    AttentionInterface.register(SSA_EAGER, ssa_eager_attention)
    AttentionMaskInterface.register(SSA_EAGER, eager_mask)
    _registered = True


def ssa_implementation(requested: str) -> str:
    """The SSA attention implementation for a requested one: "sdpa" -> "ssa", "eager" -> "ssa_eager"."""
    if requested in BACKENDS.values():
        return requested
    if requested not in BACKENDS:
        raise ValueError(
            f"an SSA-converted model runs with attn_implementation 'sdpa' or 'eager' (its "
            f"temperatures live in those kernels), got {requested!r}"
        )
    return BACKENDS[requested]


class SetAttnImplementation:
    """Stands in for ``model.set_attn_implementation`` on a converted model: "sdpa" / "eager" map to their SSA
    functions, anything else is refused (it would drop the query temperature)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, attn_implementation: str | dict, **kwargs: Any) -> None:
        if isinstance(attn_implementation, dict):
            attn_implementation = {k: ssa_implementation(v) for k, v in attn_implementation.items()}
        else:
            attn_implementation = ssa_implementation(attn_implementation)
        register()
        cast(Any, type(self.model)).set_attn_implementation(self.model, attn_implementation, **kwargs)
