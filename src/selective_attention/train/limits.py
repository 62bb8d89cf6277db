"""Settings that cannot work, refused before the first step: a step larger than the train split, and activations
that cannot fit the device's memory (``--seq-len 100000`` would otherwise build an 800k-token step and spend
minutes before failing)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from selective_attention.errors import UserError
from selective_attention.utils.files import human_bytes

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (RAM for the CPU), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(model: nn.Module, batch: int, seq_len: int) -> int:
    """A lower bound of the memory one micro-batch's forward + backward holds: the logits (float32 for the loss,
    and their gradient), the hidden states each layer keeps for the backward pass, and the T x T attention
    scores of eager attention."""
    c = cast("PretrainedConfig", model.config)
    vocab = c.vocab_size
    d = getattr(c, "hidden_size", 0) or getattr(c, "n_embd", 0)
    layers = getattr(c, "num_hidden_layers", 0) or getattr(c, "n_layer", 0)
    heads = getattr(c, "num_attention_heads", 0) or getattr(c, "n_head", 0)
    tokens = batch * seq_len
    total = tokens * vocab * 4 * 2  # logits in float32 and their gradient
    total += layers * tokens * d * 4 * 4  # a few (B, T, d) tensors per layer
    if "eager" in str(getattr(c, "_attn_implementation", "")):
        total += layers * batch * heads * seq_len * seq_len * 4  # (B, nh, T, T) attention probabilities
    return total


def check_fits(
    model: nn.Module, device: torch.device, batch: int, seq_len: int, step_tokens: int, train_tokens: int
) -> None:
    """UserError when one optimizer step needs more tokens than the train split holds, or a micro-batch more
    memory than the device has."""
    if step_tokens > train_tokens:
        raise UserError(
            f"one optimizer step takes {step_tokens:,} tokens (--batch-size x --grad-accum x processes x "
            f"(--seq-len + 1)), more than the whole train split ({train_tokens:,} tokens): lower "
            "--seq-len or --batch-size"
        )
    need, have = activation_bytes(model, batch, seq_len), device_memory(device)
    if have is not None and need > have:
        raise UserError(
            f"--seq-len {seq_len} with --batch-size {batch} needs at least {human_bytes(need)} of "
            f"activations per micro-batch, more than the {human_bytes(have)} of {device.type} memory: "
            "lower --seq-len or --batch-size (--grad-accum keeps the tokens per step)"
        )
