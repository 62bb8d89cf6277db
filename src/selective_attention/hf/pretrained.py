"""Save / load, parameter counts and temperature read-out for converted Hugging Face models."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.hf.convert import TEMPERATURE_ATTR, _state, convert, is_converted
from selective_attention.temperature import temperature_parameters


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def _ssa_tensors(path: Path) -> dict[str, Tensor]:
    """The SSA temperature tensors stored in the model dir (safetensors only: nothing is unpickled)."""
    out: dict[str, Tensor] = {}
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if f".{TEMPERATURE_ATTR}." in k:
                    out[k] = st.get_tensor(k)
    return out


def from_pretrained(path: str | os.PathLike, *, attn_implementation: str | None = None, **kwargs: Any) -> nn.Module:
    """Load an SSA-converted (config.json has "ssa") or a plain Hugging Face causal LM directory.

    The base class comes from config.json through ``AutoModelForCausalLM`` (no ``trust_remote_code``); the base
    weights load through transformers, then ``convert`` adds the temperatures and their saved tensors are loaded
    exactly from the safetensors files. ``attn_implementation``: "sdpa" (default) or "eager" for a converted
    model. Other keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"not a Hugging Face model directory (no config.json): {path}")
    kwargs.setdefault("trust_remote_code", False)
    ssa = json.loads(cfg_file.read_text()).get("ssa")
    if ssa is None:
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    backend = attn_implementation or "sdpa"
    backend = {"ssa": "sdpa", "ssa_eager": "eager"}.get(backend, backend)
    if backend not in ("sdpa", "eager"):
        raise ValueError(f"a converted model runs with attn_implementation 'sdpa' or 'eager', got {backend!r}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the stock class reports the SSA tensors as unexpected keys: expected
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=backend, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    convert(model, SSAConfig.from_dict(ssa), backend=backend)
    saved = _ssa_tensors(path)
    expected = {k for k in model.state_dict() if f".{TEMPERATURE_ATTR}." in k}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"{path}: SSA tensors do not match the config (missing {missing[:3]}, unexpected "
                         f"{extra[:3]})")
    result = model.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys
    return model


def _drop_dequantised_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF loaded as plain float tensors (no packed GGUF modules) is an ordinary model: forget the GGUF
    quantizer so that it saves to safetensors and trains like one (transformers refuses to save it otherwise)."""
    q = getattr(model, "hf_quantizer", None)
    if q is None or type(q).__name__ != "GgufHfQuantizer" or getattr(q, "packed_modules", None):
        return
    if any(not p.is_floating_point() for p in model.parameters()):
        return
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_pretrained(path_or_gguf: str | os.PathLike, **kwargs: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a Hugging Face dir (SSA-converted or plain) or a .gguf file, offline, float32
    for GGUF (dequantised). The tokenizer is None when the directory has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path_or_gguf)
    if not p.exists():
        raise UserError(f"no such model file or directory: {p}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"expected a model directory or a .gguf file, got {p}")
        kwargs.setdefault("dtype", torch.float32)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kwargs)
        _drop_dequantised_gguf_quantizer(model)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return model, tok
    model = from_pretrained(p, **kwargs)
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError):
        tok = None
    return model, tok


def parameter_report(model: nn.Module) -> dict[str, Any]:
    """{"base", "new", "total", "percent"}: parameters of the original model, added by SSA, and new / base in %."""
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    new = sum(p.numel() for p in temperature_parameters(model))
    base = total - new
    return {"base": base, "new": new, "total": total, "percent": 100.0 * new / base if base else 0.0}


@torch.no_grad()
def model_temperatures(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None
                       ) -> dict[str, Tensor]:
    """Per-layer query and value temperatures {"query": (L, B, H, T), "value": (L, B, H, T)} in float32 for one
    forward pass (value heads repeated for GQA; a target without a temperature reports ones). Positions follow
    the attention mask (left padding), as in ``generate``."""
    if not is_converted(model):
        raise ValueError(f"{type(model).__name__} is not SSA-converted")
    attns = [m for m in model.modules() if hasattr(m, "_ssa_state")]
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    for a in attns:
        _state(a).record = []
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        records = [_state(a).record for a in attns]
    finally:
        for a in attns:
            _state(a).record = None
    B, T = input_ids.shape
    out: dict[str, Tensor] = {}
    for target in ("query", "value"):
        layers = []
        for a, rec in zip(attns, records):
            H = _state(a).n_heads
            tau = rec[-1].get(target) if rec else None
            if tau is None:
                tau = torch.ones(B, H, T)
            tau = tau.float().cpu().expand(B, -1, T)
            if tau.shape[1] != H:
                tau = tau.repeat_interleave(H // tau.shape[1], dim=1)
            layers.append(tau)
        out[target] = torch.stack(layers)  # (L, B, H, T)
    return out
