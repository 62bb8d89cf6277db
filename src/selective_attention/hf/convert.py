"""Fit SSA onto a Hugging Face causal LM in place, without copying any model code.

How the temperatures reach a stock ``transformers`` attention module (SPEC.md section 2):

- a forward pre-hook on the attention module remembers the hidden state x and each token's absolute 1-indexed
  position p (``position_ids + 1``, so left padding and the KV cache are handled exactly as the base model does);
- hooks on the q / k / v projections (separate ``q_proj`` ... or a fused ``c_attn`` / ``query_key_value``) see
  each projection *before* RoPE, compute tau there, and
    * multiply the new tokens' values by tau_v (and keys by tau_k) right away, so the KV cache stores
      temperature-scaled values and cached decoding equals the full forward;
    * hand tau_q to the attention function;
- the attention function registered as ``"ssa"`` (SDPA kernel) or ``"ssa_eager"`` (the family's eager kernel)
  with ``transformers.AttentionInterface`` multiplies q (after RoPE / q-norm: a per-token scalar commutes with
  both) by tau_q and calls the base kernel with the mask that ``AttentionMaskInterface`` built for it.
No T x T matrix is added: the SDPA path stays fused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

from selective_attention.config import SSAConfig
from selective_attention.functional import apply_temperature
from selective_attention.temperature import SSATemperatures

SSA_SDPA, SSA_EAGER = "ssa", "ssa_eager"
BACKENDS = {"sdpa": SSA_SDPA, "eager": SSA_EAGER}
TEMPERATURE_ATTR = "ssa_temperature"  # submodule name on each attention module: keys "...attn.ssa_temperature.*"


# --------------------------------------------------------------------------------------------------------------
# Where the projections live in one attention module (filled in by the per-family adapters)


@dataclass
class Site:
    """One attention module and how to read its q / k / v projections.

    Either ``separate`` = {"query": q_proj, "key": k_proj, "value": v_proj} whose outputs are (B, T, heads * D),
    or ``fused`` = one module whose output (B, T, ...) ``split`` cuts into per-head views (B, T, heads, D) and
    ``join`` puts back together.
    """

    attn: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    separate: dict[str, nn.Module] = field(default_factory=dict)
    fused: nn.Module | None = None
    split: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
    join: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None  # (out, q, k, v) -> new out


class SSAState:
    """Per-attention-module runtime state; a plain object (not a Module) so it never reaches the state dict."""

    def __init__(self, site: Site) -> None:
        self.n_heads, self.n_kv_heads, self.head_dim = site.n_heads, site.n_kv_heads, site.head_dim
        self.hidden: Tensor | None = None  # (B, T, C) input of the attention module
        self.positions: Tensor | None = None  # (B|1, T) absolute 1-indexed
        self.tau_q: Tensor | None = None  # (B|1, H, T), consumed by the attention function
        self.record: list[dict[str, Tensor | None]] | None = None  # model_temperatures() collects here
        self.handles: list[Any] = []


def _temps(attn: nn.Module) -> SSATemperatures:
    return getattr(attn, TEMPERATURE_ATTR)


def _state(attn: nn.Module) -> SSAState:
    return attn._ssa_state


# --------------------------------------------------------------------------------------------------------------
# Hooks. Small callable classes rather than closures, so that copy.deepcopy(model) re-points them at the copy.


def _find_positions(x: Tensor, kwargs: dict[str, Any], layer_idx: int | None) -> Tensor:
    """Absolute 1-indexed positions (B|1, T): HF's position_ids + 1 (generate derives them from the attention mask
    under left padding), else the cache length offset."""
    T = x.shape[1]
    pos = kwargs.get("position_ids")
    if isinstance(pos, Tensor):
        if pos.dim() == 3:  # multimodal rotary (3, B, T): the temporal stream is the text position
            pos = pos[0]
        pos = pos if pos.dim() == 2 else pos[None]
        if pos.shape[-1] == T:
            return pos + 1
    past = 0
    for v in kwargs.values():
        if isinstance(v, Cache):
            past = v.get_seq_length(layer_idx or 0)
            break
    return torch.arange(past + 1, past + T + 1, device=x.device)[None]


class _CaptureInputs:
    """Forward pre-hook on the attention module: remember x and the absolute positions."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(x, Tensor):
            raise ValueError(f"SSA: cannot find the hidden state passed to {type(module).__name__}")
        st = _state(self.attn)
        st.hidden = x
        st.positions = _find_positions(x, kwargs, getattr(module, "layer_idx", None))
        st.tau_q = None
        if st.record is not None:
            st.record.append({})  # one entry per forward of this layer


class _Release:
    """Forward hook on the attention module: drop the captured tensors (no activations kept past the layer)."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def __call__(self, module: nn.Module, args: tuple, out: Any) -> None:
        st = _state(self.attn)
        st.hidden = st.positions = st.tau_q = None


def _heads_view(t: Tensor, heads: int, head_dim: int) -> Tensor:
    """(B, T, heads * D) -> (B, heads, T, D), a view."""
    B, T = t.shape[:2]
    return t.view(B, T, heads, head_dim).transpose(1, 2)


def _scale_bthd(t: Tensor, tau: Tensor | None) -> Tensor:
    """t (B, T, heads, D) times tau (B|1, heads, T), in float32, returned in t's dtype."""
    if tau is None:
        return t
    return (t.float() * tau.transpose(1, 2).unsqueeze(-1)).to(t.dtype)


def _compute(attn: nn.Module, target: str, proj: Tensor) -> Tensor | None:
    """tau for ``target`` from its pre-RoPE projection proj (B, heads, T, D); None when the target is off."""
    temps, st = _temps(attn), _state(attn)
    if target not in temps:
        return None
    if st.hidden is None or st.positions is None:
        raise RuntimeError("SSA: a projection ran outside its attention module's forward")
    return temps(target, projection=proj, hidden=st.hidden, positions=st.positions)


def _note(st: SSAState, target: str, tau: Tensor | None) -> None:
    if st.record is not None and st.record:
        st.record[-1][target] = None if tau is None else tau.detach().float()


class _SeparateHook:
    """Forward hook on q_proj / k_proj / v_proj, output (B, T, heads * D)."""

    def __init__(self, attn: nn.Module, target: str) -> None:
        self.attn, self.target = attn, target

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        st = _state(self.attn)
        heads = st.n_heads if self.target == "query" else st.n_kv_heads
        tau = _compute(self.attn, self.target, _heads_view(out, heads, st.head_dim))
        _note(st, self.target, tau)
        if self.target == "query":
            st.tau_q = tau  # applied after RoPE in the attention function
            return None
        if tau is None:
            return None
        B, T = out.shape[:2]
        return _scale_bthd(out.view(B, T, heads, st.head_dim), tau).view(out.shape)  # before the KV cache


class _FusedHook:
    """Forward hook on a fused qkv projection."""

    def __init__(self, attn: nn.Module, split: Callable, join: Callable) -> None:
        self.attn, self.split, self.join = attn, split, join

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        st = _state(self.attn)
        q, k, v = self.split(out)  # (B, T, heads, D) each
        taus = {t: _compute(self.attn, t, x.transpose(1, 2)) for t, x in (("query", q), ("key", k), ("value", v))}
        for t in ("query", "key", "value"):
            _note(st, t, taus[t])
        st.tau_q = taus["query"]
        if taus["key"] is None and taus["value"] is None:
            return out
        return self.join(out, q, _scale_bthd(k, taus["key"]), _scale_bthd(v, taus["value"]))


# --------------------------------------------------------------------------------------------------------------
# The attention functions registered with transformers


def _eager_kernel(module: nn.Module) -> Callable:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward: use the sdpa backend")
    return fn


def _with_tau_q(module: nn.Module, query: Tensor) -> Tensor:
    st = getattr(module, "_ssa_state", None)
    if st is None or st.tau_q is None:
        return query
    tau, st.tau_q = st.tau_q, None
    if tau.shape[-1] != query.shape[2]:
        raise RuntimeError(f"SSA: tau_q covers {tau.shape[-1]} tokens but the query has {query.shape[2]}")
    return apply_temperature(query, tau)  # (B, H, T, D) * (B|1, H, T)


def ssa_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """q/k/v (B, H, T, D) after RoPE and the cache update; v (and k) already carry their temperatures."""
    return sdpa_attention_forward(module, _with_tau_q(module, query), key, value, attention_mask, **kwargs)


def ssa_eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    return _eager_kernel(module)(module, _with_tau_q(module, query), key, value, attention_mask, **kwargs)


AttentionInterface.register(SSA_SDPA, ssa_sdpa_attention)
AttentionMaskInterface.register(SSA_SDPA, sdpa_mask)  # without it the mask arrives as None (FACTS.md)
AttentionInterface.register(SSA_EAGER, ssa_eager_attention)
AttentionMaskInterface.register(SSA_EAGER, eager_mask)


# --------------------------------------------------------------------------------------------------------------
# convert


def find_sites(model: nn.Module) -> list[Site]:
    """The attention modules of ``model`` as Sites, through the family adapter; ValueError if unsupported."""
    from selective_attention.hf import generic, gpt2, gpt_neox, llama

    for adapter in (gpt2, gpt_neox, llama, generic):
        if adapter.matches(model):
            sites = adapter.sites(model)
            if sites:
                return sites
    raise ValueError(f"SSA convert: unsupported model class {type(model).__name__}: supported are GPT-2, GPT-NeoX, "
                     "Llama-style (q_proj/k_proj/v_proj) models and any causal LM whose attention calls the "
                     "transformers AttentionInterface")


def mlp_hidden_for(model: nn.Module, sites: list[Site], config: SSAConfig) -> int | None:
    """Width of the ``sharing="mlp"`` token MLP: the whole model grows by ``config.mlp_growth``."""
    if config.sharing != "mlp" or not config.token_aware:
        return None
    if config.mlp_hidden is not None:
        return config.mlp_hidden
    base = sum(p.numel() for p in model.parameters())
    s = sites[0]
    heads = {"query": s.n_heads, "key": s.n_kv_heads, "value": s.n_kv_heads}
    per_unit = len(sites) * sum(s.d_model + 1 + heads[t] for t in config.targets)  # params per hidden unit
    r = config.mlp_growth * base / per_unit
    return max(2, 2 * round(r / 2))


def is_converted(model: nn.Module) -> bool:
    return any(hasattr(m, "_ssa_state") for m in model.modules())


def convert(model: PreTrainedModel, config: SSAConfig | None = None, *, backend: str | None = None) -> PreTrainedModel:
    """Add SSA temperatures to every self-attention layer of a ``transformers`` causal LM, in place.

    With ``init="identity"`` (default) the converted model computes exactly the original function.
    ``backend``: "sdpa" or "eager" kernel under the temperatures; default: the model's current implementation
    ("eager" stays eager, anything else becomes SDPA). The choice is ``model.config._attn_implementation``
    ("ssa" or "ssa_eager") and can be changed later with ``model.set_attn_implementation``.
    """
    config = config or SSAConfig()
    if not isinstance(model, nn.Module):
        raise ValueError(f"SSA convert needs a torch model, got {type(model).__name__}")
    if is_converted(model):
        raise ValueError(f"{type(model).__name__} is already converted to SSA")
    sites = find_sites(model)
    if config.key and any(hasattr(s.attn, "k_norm") for s in sites):
        # tau_k must act after the key norm and before the cache; not wired up (the key temperature is an ablation)
        raise ValueError(f"SSA key temperature is not supported on {type(model).__name__} (it normalises keys)")
    if backend is None:
        current = getattr(model.config, "_attn_implementation", None)
        backend = "eager" if current in ("eager", SSA_EAGER) else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'sdpa' or 'eager', got {backend!r}")
    if backend == "eager":
        _eager_kernel(sites[0].attn)
    r = mlp_hidden_for(model, sites, config)
    for s in sites:
        ref = next(s.attn.parameters())
        temps = SSATemperatures(s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, config, mlp_hidden=r)
        temps.to(device=ref.device, dtype=ref.dtype)
        temps.reset_parameters()  # identity init under our control (HF's _init_weights never sees these)
        s.attn.add_module(TEMPERATURE_ATTR, temps)
        st = SSAState(s)
        s.attn._ssa_state = st
        st.handles.append(s.attn.register_forward_pre_hook(_CaptureInputs(s.attn), with_kwargs=True))
        st.handles.append(s.attn.register_forward_hook(_Release(s.attn)))
        if s.fused is not None:
            st.handles.append(s.fused.register_forward_hook(_FusedHook(s.attn, s.split, s.join)))
        else:
            for target, proj in s.separate.items():
                if target in temps or target == "query":
                    st.handles.append(proj.register_forward_hook(_SeparateHook(s.attn, target)))
    model.config.ssa = config.to_dict()
    if config.mlp_hidden is None and r is not None:
        model.config.ssa["mlp_hidden"] = r  # pin the width so that from_pretrained rebuilds the same shapes
    model.set_attn_implementation(BACKENDS[backend])
    return model
