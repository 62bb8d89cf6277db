"""Family adapters: each tells ``convert`` where one family's attention modules and projections are.

Every adapter is a module with ``matches(model) -> bool`` and ``sites(model) -> list[Site]``; ``ADAPTERS`` is
the one list of them, tried in order (the generic one last)."""

from __future__ import annotations

from torch import nn

from selective_attention.hf.adapters import generic, gpt2, gpt_neox, llama
from selective_attention.hf.site import Site

ADAPTERS = (gpt2, gpt_neox, llama, generic)


def find_sites(model: nn.Module) -> list[Site]:
    """The attention modules of ``model`` as Sites, through the first adapter that matches; ValueError if none."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            sites = adapter.sites(model)
            if sites:
                return sites
    raise ValueError(
        f"SSA convert: unsupported model class {type(model).__name__}: supported are GPT-2, GPT-NeoX, "
        "Llama-style (q_proj/k_proj/v_proj) models and any causal LM whose attention calls the "
        "transformers AttentionInterface"
    )
