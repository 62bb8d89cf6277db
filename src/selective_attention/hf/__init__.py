"""Fit SSA onto pretrained Hugging Face causal LMs: ``convert``, save/load, parameter counts, temperatures.

Layout: ``site`` (what an adapter reports), ``adapters/`` (one per family, listed in ``adapters.ADAPTERS``),
``state`` (per-module runtime state), ``hooks`` (what feeds the temperatures in), ``attention`` (the registered
attention functions, ``register()``), ``convert``, ``pretrained`` (load), ``readout`` (counts, temperatures),
``save`` (model directories with a manifest), ``lora`` (PEFT LoRA helpers; peft is imported only there)."""

from selective_attention.hf.attention import register
from selective_attention.hf.convert import convert
from selective_attention.hf.pretrained import from_pretrained, load_pretrained
from selective_attention.hf.readout import model_temperatures, parameter_report
from selective_attention.hf.save import save_pretrained
from selective_attention.hf.state import is_converted, ssa_state, ssa_temperatures

__all__ = [
    "convert",
    "is_converted",
    "from_pretrained",
    "load_pretrained",
    "model_temperatures",
    "parameter_report",
    "register",
    "save_pretrained",
    "ssa_state",
    "ssa_temperatures",
]
