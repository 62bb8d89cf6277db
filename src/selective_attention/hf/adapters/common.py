"""Helpers shared by the family adapters: projection shapes (through PEFT wrappers), norms, separate sites."""

from __future__ import annotations

import re

from torch import Tensor, nn

from selective_attention.hf.site import BHTD, BTHD, Site

# Norms that follow a projection, by attribute name, and the layout they are called on: *_norm on the
# (B, T, heads, D) view (Qwen3, Gemma3/3n/4, Cohere; OLMo2's on the flat (B, T, heads * D) is told by its rank),
# *_layernorm on (B, heads, T, D) (Phi, StableLM).
NORMS = {
    "query": (("q_norm", BTHD), ("q_layernorm", BHTD)),
    "key": (("k_norm", BTHD), ("k_layernorm", BHTD)),
    "value": (("v_norm", BTHD), ("v_layernorm", BHTD)),
}
_NORM_LIKE = re.compile(r"(^|_)(norm|layernorm|ln|rmsnorm)($|_)|norm$", re.IGNORECASE)


def base_layer(m: nn.Module | Tensor) -> nn.Module | Tensor:
    """The layer under a PEFT tuner wrapper (``lora.Linear.base_layer``), else ``m``."""
    while hasattr(m, "base_layer") and isinstance(m.base_layer, nn.Module):
        m = m.base_layer
    return m


def linear_dims(m: nn.Module | Tensor | None) -> tuple[int, int] | None:
    """(in_features, out_features) of a linear projection (plain, quantised or PEFT-wrapped), else None."""
    if m is None:
        return None
    m = base_layer(m)
    fi, fo = getattr(m, "in_features", None), getattr(m, "out_features", None)
    if isinstance(fi, int) and isinstance(fo, int):
        return fi, fo
    return None


def projection_dims(attn: nn.Module, name: str) -> tuple[int, int]:
    """``linear_dims`` of the projection ``attn.<name>`` that an adapter relies on; ValueError when it is none."""
    dims = linear_dims(getattr(attn, name, None))
    if dims is None:
        raise ValueError(f"{type(attn).__name__}.{name} is not a linear projection")
    return dims


def has_separate_projections(m: nn.Module) -> bool:
    return all(linear_dims(getattr(m, n, None)) is not None for n in ("q_proj", "k_proj", "v_proj"))


def is_kv_shared(m: nn.Module) -> bool:
    """A layer that reuses another layer's keys / values (Gemma3n / Gemma4 KV sharing): it has only q_proj."""
    return bool(getattr(m, "is_kv_shared_layer", False)) and linear_dims(getattr(m, "q_proj", None)) is not None


def head_dim_of(attn: nn.Module, fallback_heads: int | None) -> int:
    D = getattr(attn, "head_dim", None)
    if D is None:
        cfg = getattr(attn, "config", None)
        D = getattr(cfg, "head_dim", None)
        if not D:
            if fallback_heads is None:
                raise ValueError(f"{type(attn).__name__}: neither a head_dim nor a head count to derive it from")
            D = projection_dims(attn, "q_proj")[1] // fallback_heads
    return int(D)


def norm_like_children(attn: nn.Module) -> list[str]:
    """Names of ``attn``'s direct submodules that look like a normalisation."""
    return [n for n, _ in attn.named_children() if _NORM_LIKE.search(n)]


def separate_norms(attn: nn.Module) -> dict[str, tuple[str, str]]:
    out = {}
    for target, options in NORMS.items():
        for name, layout in options:
            if isinstance(getattr(attn, name, None), nn.Module):
                out[target] = (name, layout)
    return out


def separate_site(attn: nn.Module, name: str = "") -> Site:
    """Site of an attention module with q_proj / k_proj / v_proj (v_proj may be None: values are the keys, as in
    Gemma4's ``attention_k_eq_v``), or q_proj only for a KV-sharing layer; GQA / MQA read off the shapes."""
    cfg = getattr(attn, "config", None)
    D = head_dim_of(attn, getattr(cfg, "num_attention_heads", None))
    d_model, q_out = projection_dims(attn, "q_proj")
    H = q_out // D
    if is_kv_shared(attn) and linear_dims(getattr(attn, "k_proj", None)) is None:
        Hkv = int(getattr(cfg, "num_key_value_heads", None) or H)
        return Site(
            attn,
            H,
            Hkv,
            D,
            d_model,
            separate={"query": "q_proj"},
            norms=separate_norms(attn),
            kv_shared=True,
            name=name,
        )
    k_out = projection_dims(attn, "k_proj")[1]
    v_src = "v_proj" if linear_dims(getattr(attn, "v_proj", None)) is not None else "k_proj"
    v_out = projection_dims(attn, v_src)[1]
    Hkv = k_out // D
    if H * D != q_out or Hkv * D != k_out or Hkv * D != v_out:
        raise ValueError(f"{type(attn).__name__}: projections do not split into heads of size {D}")
    return Site(
        attn,
        H,
        Hkv,
        D,
        d_model,
        separate={"query": "q_proj", "key": "k_proj", "value": v_src},
        norms=separate_norms(attn),
        name=name,
    )
