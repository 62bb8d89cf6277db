"""Fit SSA onto pretrained Hugging Face causal LMs: ``convert``, save/load, parameter counts, temperatures."""

from selective_attention.hf.convert import convert, is_converted
from selective_attention.hf.pretrained import from_pretrained, load_pretrained, model_temperatures, parameter_report

__all__ = ["convert", "is_converted", "from_pretrained", "load_pretrained", "model_temperatures",
           "parameter_report"]
