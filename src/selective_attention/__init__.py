"""Selective Self-Attention (SSA): per-token learned inverse temperatures for attention.

Zhang et al., "Selective Attention: Enhancing Transformer through Principled Context Control", NeurIPS 2024.
"""

from selective_attention.config import SSAConfig
from selective_attention.functional import reference_attention, selective_attention
from selective_attention.layer import KVCache, SelectiveSelfAttention
from selective_attention.temperature import param_groups, temperature_parameters

__version__ = "0.1.0"

__all__ = [
    "SSAConfig",
    "selective_attention",
    "reference_attention",
    "SelectiveSelfAttention",
    "KVCache",
    "param_groups",
    "temperature_parameters",
    "convert",
    "from_pretrained",
    "parameter_report",
    "load_pretrained",
    "model_temperatures",
]


def __getattr__(name: str):  # the Hugging Face adapter imports transformers: load it only when asked
    if name in ("convert", "from_pretrained", "parameter_report", "load_pretrained", "model_temperatures"):
        from selective_attention import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'selective_attention' has no attribute {name!r}")
