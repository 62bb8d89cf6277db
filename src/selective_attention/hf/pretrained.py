"""Load SSA-converted (or plain) Hugging Face models: a directory or a .gguf file, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError, first_line
from selective_attention.hf.attention import register
from selective_attention.hf.convert import convert
from selective_attention.hf.state import TEMPERATURE_ATTR
from selective_attention.temperature import legacy_alpha_to_coefficient
from selective_attention.utils.packages import BUNDLED_MODELS, resolve_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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
    record = json.loads(cfg_file.read_text())
    method = record.get("ssa_method")  # methods.METHOD_ATTR: a model of another method (gated, ...)
    if isinstance(method, dict):
        raise UserError(
            f"{path}: a model of the attention method {method.get('name')!r}, which this loader would "
            "silently drop: load it with selective_attention.methods.load_model"
        )
    ssa = record.get("ssa")
    if ssa is None:
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    backend = attn_implementation or "sdpa"
    backend = {"ssa": "sdpa", "ssa_eager": "eager"}.get(backend, backend)
    if backend not in ("sdpa", "eager"):
        raise ValueError(f"a converted model runs with attn_implementation 'sdpa' or 'eager', got {backend!r}")
    register()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the stock class reports the SSA tensors as unexpected keys: expected
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=backend, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    config = SSAConfig.from_dict(ssa)
    convert(model, config, backend=backend)
    saved = _ssa_tensors(path)
    legacy_alpha_to_coefficient(saved, ssa.get("init", "identity") == "identity", config.position_scale)
    expected = {k for k in model.state_dict() if f".{TEMPERATURE_ATTR}." in k}
    if set(saved) != expected:
        missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
        raise ValueError(f"{path}: SSA tensors do not match the config (missing {missing[:3]}, unexpected {extra[:3]})")
    result = model.load_state_dict(saved, strict=False)
    assert not result.unexpected_keys
    return model


def _drop_dequantised_gguf_quantizer(model: PreTrainedModel) -> None:
    """A GGUF loaded as plain float tensors (no packed GGUF modules) is an ordinary model: forget the GGUF
    quantizer so that it saves to safetensors and trains like one (transformers refuses to save it otherwise)."""
    q = getattr(model, "hf_quantizer", None)
    if q is None or type(q).__name__ != "GgufHfQuantizer" or getattr(q, "packed_modules", None):
        return
    if any(not p.is_floating_point() for p in model.parameters()):
        return
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module types attribute assignment Tensor | Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and buffers to ``dtype`` in place (master weights), integer / quantised ones kept; works
    where ``model.to(dtype)`` is refused (a model that still carries a quantizer)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.to(dtype)


def _load_gguf(p: Path, dtype: torch.dtype | None, kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(p.parent), gguf_file=p.name, dtype=dtype or torch.float32, **kwargs
    )
    _drop_dequantised_gguf_quantizer(model)
    return model, AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def _load(p: Path, dtype: torch.dtype | None, kwargs: dict[str, Any]) -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer

    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"expected a model directory or a .gguf file, got {p}")
        model, tok = _load_gguf(p, dtype, kwargs)
    else:
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = from_pretrained(p, **kwargs)
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
        except (OSError, ValueError):
            tok = None
    if dtype is not None:
        _cast_floating(model, dtype)
    return model, tok


def load_pretrained(
    path_or_gguf: str | os.PathLike, *, dtype: torch.dtype | None = None, **kwargs: Any
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a Hugging Face dir (SSA-converted or plain), a .gguf file or the name of a bundled
    model (``"smollm2-135m"``: utils.packages.resolve_model), offline. The tokenizer is None when the directory
    has none.

    ``dtype``: the floating dtype of every floating parameter (``torch.float32`` for float32 master weights);
    default: the checkpoint's own for a directory, float32 for GGUF (dequantised). Any failure to load raises
    ``UserError`` with a one-line message."""
    p = resolve_model(path_or_gguf)
    if not p.exists():
        raise UserError(f"no such model file or directory: {p} (bundled models, by name: {', '.join(BUNDLED_MODELS)})")
    try:
        return _load(p, dtype, dict(kwargs))
    except UserError:
        raise
    except Exception as e:  # a broken config / weights / tokenizer: one line, never a traceback at the CLI
        raise UserError(f"cannot load model {p}: {(first_line(e) or type(e).__name__)}") from e
