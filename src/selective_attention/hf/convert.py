"""Fit SSA onto a Hugging Face causal LM in place, without copying any model code (the method: docs/method.md).

An adapter (``hf/adapters``) finds each self-attention module's projections and norms (a ``Site``); ``convert``
adds an ``SSATemperatures`` submodule there, installs the hooks of ``hf/hooks.py`` and switches the model to the
attention functions of ``hf/attention.py``. Every requested temperature either takes effect at every site or
``convert`` raises, naming the module and the temperature.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from selective_attention.config import SSAConfig
from selective_attention.hf.adapters import find_sites
from selective_attention.hf.adapters.common import NORMS, norm_like_children
from selective_attention.hf.attention import BACKENDS, SSA_EAGER, SetAttnImplementation, eager_kernel, register
from selective_attention.hf.hooks import install
from selective_attention.hf.site import Site
from selective_attention.hf.state import STATE_ATTR, TEMPERATURE_ATTR, SSAState, is_converted
from selective_attention.temperature import SSATemperatures

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def site_targets(site: Site, config: SSAConfig) -> tuple[str, ...]:
    """The temperatures ``site`` carries: all requested ones, the query only on a KV-sharing layer (its keys and
    values are another layer's, which carry that layer's temperatures)."""
    return tuple(t for t in config.targets if not site.kv_shared or t == "query")


def check_site(site: Site, config: SSAConfig) -> None:
    """Raise unless every requested key / value temperature acts where the attention sees it."""
    where = site.name or type(site.attn).__name__
    known = {name for options in NORMS.values() for name, _ in options}
    for target in ("key", "value"):
        if target not in config.targets or site.kv_shared:
            continue
        unknown = [n for n in norm_like_children(site.attn) if n not in known]
        if site.fused is not None:
            unknown += [n for n in norm_like_children(site.attn) if n in known]
        if unknown and target not in site.norms:
            raise ValueError(
                f"SSA {target} temperature: {where} has {unknown[0]!r}, a normalisation SSA does not "
                f"know how to follow, which would cancel it (drop the {target} temperature)"
            )
    if site.fused is None:
        scaled_at = [
            site.separate[t] for t in config.targets if t != "query" and t not in site.norms and t in site.separate
        ]
        if len(scaled_at) != len(set(scaled_at)):
            raise ValueError(f"SSA: {where}: the key and value temperatures would both scale {scaled_at[0]}")


def mlp_hidden_for(model: nn.Module, sites: list[Site], config: SSAConfig) -> int | None:
    """Width of the ``sharing="mlp"`` token MLP: the whole model grows by ``config.mlp_growth``."""
    if config.sharing != "mlp" or not config.token_aware:
        return None
    if config.mlp_hidden is not None:
        return config.mlp_hidden
    base = sum(p.numel() for p in model.parameters())
    per_unit = sum(s.d_model + 1 + s.heads(t) for s in sites for t in site_targets(s, config))  # per hidden unit
    r = config.mlp_growth * base / per_unit
    return max(2, 2 * round(r / 2))


def temperature_dtype(attn: nn.Module, model: nn.Module) -> torch.dtype:
    """The floating dtype the temperatures live in: the attention module's (its norms, biases), else the model's
    first floating parameter's, else float32; never a quantised weight's integer dtype."""
    for mod in (attn, model):
        for p in mod.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _hf_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model itself (under a PEFT wrapper, its base model)."""
    get = getattr(model, "get_base_model", None)
    return cast("PreTrainedModel", get() if callable(get) else model)


def convert(model: nn.Module, config: SSAConfig | None = None, *, backend: str | None = None) -> nn.Module:
    """Add SSA temperatures to every self-attention layer of a ``transformers`` causal LM, in place.

    With ``init="identity"`` (default) the converted model computes exactly the original function.
    ``backend``: "sdpa" or "eager" kernel under the temperatures; default: the model's current implementation
    ("eager" stays eager, anything else becomes SDPA). The choice is ``model.config._attn_implementation``
    ("ssa" or "ssa_eager"); ``model.set_attn_implementation("sdpa" | "eager")`` switches between the two later.
    A PEFT model (LoRA already applied) converts too: the hooks follow the LoRA-wrapped projections.
    """
    config = config or SSAConfig()
    if not isinstance(model, nn.Module):
        raise ValueError(f"SSA convert needs a torch model, got {type(model).__name__}")
    if is_converted(model):
        raise ValueError(f"{type(model).__name__} is already converted to SSA")
    sites = find_sites(model)
    for s in sites:
        check_site(s, config)
    hf_model = _hf_model(model)
    if backend is None:
        current = getattr(hf_model.config, "_attn_implementation", None)
        backend = "eager" if current in ("eager", SSA_EAGER) else "sdpa"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'sdpa' or 'eager', got {backend!r}")
    if backend == "eager":
        eager_kernel(sites[0].attn)
    register()
    r = mlp_hidden_for(model, sites, config)
    for s in sites:
        targets = site_targets(s, config)
        if not targets:
            continue
        cfg = config if targets == config.targets else dataclasses.replace(config, key=False, value=False)
        ref = next(iter(s.attn.parameters()), None)
        temps = SSATemperatures(s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, cfg, mlp_hidden=r)
        temps.to(device=ref.device if ref is not None else None, dtype=temperature_dtype(s.attn, model))
        temps.reset_parameters()  # identity init under our control (HF's _init_weights never sees these)
        s.attn.add_module(TEMPERATURE_ATTR, temps)
        st = SSAState(s)
        setattr(s.attn, STATE_ATTR, st)  # a plain object, not a submodule: never in the state dict
        install(s, st, targets)
    hf_model.config.ssa = config.to_dict()
    if config.mlp_hidden is None and r is not None:
        hf_model.config.ssa["mlp_hidden"] = r  # pin the width so that from_pretrained rebuilds the same shapes
    type(hf_model).set_attn_implementation(hf_model, BACKENDS[backend])
    # "sdpa" / "eager" keep the temperatures; setattr: an instance attribute over the method, on purpose
    setattr(hf_model, "set_attn_implementation", SetAttnImplementation(hf_model))  # noqa: B010
    return model
