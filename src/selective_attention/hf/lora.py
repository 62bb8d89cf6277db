"""SSA with PEFT LoRA (``pip install selective-attention[peft]``; peft is imported only when these are called).

Both orders work: ``convert`` then ``get_peft_model``, or LoRA first and ``convert`` on the PEFT model; the hooks
follow the LoRA-wrapped projections (they see base + LoRA delta), so the model equals SSA on the merged weights.
The recipe that also trains and saves the temperatures::

    model = convert(AutoModelForCausalLM.from_pretrained(base), SSAConfig())
    peft_model = get_peft_model(model, lora_config_for(model, r=16, target_modules=["q_proj", "v_proj"]))
    ...train...                                   # LoRA adapters + temperatures (modules_to_save)
    save_lora(peft_model, "adapter/")             # adapter weights, temperatures, the SSA config
    peft_model = load_lora(base, "adapter/")      # later: base dir or .gguf + adapter dir
    merged = peft_model.merge_and_unload()        # a plain SSA model: merged.save_pretrained("ssa-merged/")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.hf.convert import convert
from selective_attention.hf.pretrained import load_pretrained
from selective_attention.hf.state import TEMPERATURE_ATTR, is_converted
from selective_attention.utils.files import follow_umask
from selective_attention.utils.io import atomic_write_json, read_json

if TYPE_CHECKING:
    from peft import PeftModel

SSA_CONFIG_FILE = "ssa_config.json"


def _peft():
    try:
        import peft
    except ImportError as e:
        raise UserError("SSA + LoRA needs peft: pip install 'selective-attention[peft]'") from e
    return peft


def lora_config_for(model: nn.Module, **lora_kwargs: Any):
    """A ``peft.LoraConfig`` that also trains and saves the SSA temperatures (``modules_to_save``)."""
    peft = _peft()
    if not is_converted(model):
        raise ValueError("lora_config_for: convert the model to SSA first")
    keep = list(lora_kwargs.pop("modules_to_save", None) or [])
    lora_kwargs.setdefault("task_type", "CAUSAL_LM")
    return peft.LoraConfig(modules_to_save=[*keep, TEMPERATURE_ATTR], **lora_kwargs)


def mark_temperatures_trainable(model: nn.Module) -> None:
    """For LoRA first, ``convert`` second: the temperatures are added after PEFT froze the base and are
    trainable already; this re-enables them after anything that froze every non-adapter parameter."""
    from selective_attention.temperature import temperature_parameters

    for p in temperature_parameters(model):
        p.requires_grad_(True)


def save_lora(peft_model: nn.Module, path: str | os.PathLike) -> Path:
    """``peft_model.save_pretrained(path)`` (adapters + temperatures) plus the SSA config to rebuild from; the
    weights file gets the mode ``open()`` would give it (safetensors writes 0o600), like ``hf.save_pretrained``."""
    path = Path(path)
    model = cast("PeftModel", peft_model)
    cfg = getattr(model.get_base_model().config, "ssa", None)
    if cfg is None:
        raise ValueError("save_lora: the model is not SSA-converted")
    model.save_pretrained(str(path))
    follow_umask(path.rglob("*.safetensors"))
    atomic_write_json(path / SSA_CONFIG_FILE, cfg)
    return path


def load_lora(
    base: str | os.PathLike, adapter: str | os.PathLike, *, is_trainable: bool = False, **load_kwargs: Any
) -> nn.Module:
    """The PEFT model saved by ``save_lora``: the base (a plain or SSA-converted dir, or a .gguf), converted with
    the saved SSA config when it is plain, then the adapters and trained temperatures."""
    peft = _peft()
    adapter = Path(adapter)
    cfg_file = adapter / SSA_CONFIG_FILE
    if not cfg_file.is_file():
        raise UserError(f"not an SSA LoRA adapter directory (no {SSA_CONFIG_FILE}): {adapter}")
    model, _ = load_pretrained(base, **load_kwargs)
    if not is_converted(model):
        convert(model, SSAConfig.from_dict(read_json(cfg_file, "the adapter's SSA config")))
    return peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
