"""The attention functions that apply tau_q, registered with ``transformers`` by ``register()`` (idempotent;
``convert`` and ``from_pretrained`` call it, importing this module registers nothing).

``"ssa"`` runs the SDPA kernel and ``"ssa_eager"`` the family's eager kernel on q * tau_q (after RoPE and any
q-norm) and the key / value that already carry their temperatures; the mask is the one
``AttentionMaskInterface`` builds for the base kernel. No T x T matrix is added: the SDPA path stays fused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from selective_attention.functional import apply_temperature
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


def _with_tau_q(module: nn.Module, query: Tensor) -> Tensor:
    st = getattr(module, STATE_ATTR, None)
    if st is None or st.tau_q is None:
        return query
    tau, st.tau_q = st.tau_q, None
    if tau.shape[-1] != query.shape[2]:
        raise RuntimeError(f"SSA: tau_q covers {tau.shape[-1]} tokens but the query has {query.shape[2]}")
    return apply_temperature(query, tau)  # (B, H, T, D) * (B|1, H, T)


def ssa_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """q/k/v (B, H, T, D) after RoPE and the cache update; v (and k) already carry their temperatures."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, _with_tau_q(module, query), key, value, attention_mask, **kwargs)


def ssa_eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    query = _with_tau_q(module, query)
    if getattr(module, "reorder_and_upcast_attn", False):  # GPT-2's float32 path, taken under "eager" only
        return module._upcast_and_reordered_attn(query, key, value, attention_mask)
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
        raise ValueError(f"an SSA-converted model runs with attn_implementation 'sdpa' or 'eager' (its "
                         f"temperatures live in those kernels), got {requested!r}")
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
        type(self.model).set_attn_implementation(self.model, attn_implementation, **kwargs)
