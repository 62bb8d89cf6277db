"""The per-attention-module SSA runtime state and the accessors other code uses instead of private attributes."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from selective_attention.hf.site import Site
from selective_attention.temperature import SSATemperatures

TEMPERATURE_ATTR = "ssa_temperature"  # submodule name on each attention module: keys "...attn.ssa_temperature.*"
STATE_ATTR = "_ssa_state"


class SSAState:
    """Runtime state of one converted attention module; a plain object (not a Module): never in the state dict."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.n_heads, self.n_kv_heads, self.head_dim = site.n_heads, site.n_kv_heads, site.head_dim
        self.hidden: Tensor | None = None  # (B, T, C) input of the attention module
        self.positions: Tensor | None = None  # (B|1, T) absolute 1-indexed
        self.positions_given = False  # they came from position_ids (which may restart: packed documents)
        self.tau_q: Tensor | None = None  # (B|1, H, T), consumed by the attention function
        self.pending: dict[str, Tensor] = {}  # key / value tau waiting for the norm after the projection
        # key / value scaled in this forward: target -> (the scaling's grad_fn, x (B, H, T, D), tau), so that the
        # attention function can let its kernel keep x instead of tau * x (functional.recomputing)
        self.scaled: dict[str, tuple[Any, Tensor, Tensor]] = {}
        self.record: list[dict[str, Tensor | None]] | None = None  # model_temperatures() collects here
        self.hooks: dict[str, Any] = {}  # attribute name on the attention module -> forward hook object
        self.bound: dict[str, nn.Module] = {}  # attribute name -> the module that hook is registered on


def ssa_state(attn: nn.Module) -> SSAState:
    """The SSA state of a converted attention module; ValueError for any other module."""
    st = getattr(attn, STATE_ATTR, None)
    if not isinstance(st, SSAState):
        raise ValueError(f"{type(attn).__name__} is not an SSA-converted attention module")
    return st


def ssa_temperatures(attn: nn.Module) -> SSATemperatures:
    """The temperature functions of a converted attention module, seen through a PEFT ``modules_to_save``
    wrapper (the trainable copy of the active adapter, or the original while adapters are disabled)."""
    m = getattr(attn, TEMPERATURE_ATTR)
    if isinstance(m, SSATemperatures):
        return m
    copies = getattr(m, "modules_to_save", None)
    active = list(getattr(m, "active_adapters", None) or [])
    if copies is not None and active and not getattr(m, "disable_adapters", False) and active[0] in copies:
        return copies[active[0]]
    original = getattr(m, "original_module", None)
    if isinstance(original, SSATemperatures):
        return original
    raise TypeError(f"{type(attn).__name__}.{TEMPERATURE_ATTR} is a {type(m).__name__}, not SSATemperatures")


def converted_attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, STATE_ATTR, None), SSAState)]


def is_converted(model: nn.Module) -> bool:
    return bool(converted_attention_modules(model))
