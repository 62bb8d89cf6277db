"""The language-modelling loss and the validation loss over the start of a token array."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selective_attention.train import distributed
from selective_attention.train.data import DocumentIndex


def logits_of(output: Any) -> torch.Tensor:
    """A model's output as logits (B, T, V): a ``.logits`` attribute (Hugging Face) or the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.logits


def model_inputs(input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> dict[str, Any]:
    """The forward's keyword arguments. With packed positions: ``position_ids`` and ``use_cache=False`` - without
    a cache and a 2-D attention mask, transformers reads position_ids that restart as separate documents and
    masks them apart (with a cache it silently would not; a converted model refuses that, hf/attention.py)."""
    if positions is None:
        return {"input_ids": input_ids}
    return {"input_ids": input_ids, "position_ids": positions, "use_cache": False}


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_tokens: int,
    info: distributed.DistInfo | None = None,
    autocast: Callable[[], Any] = nullcontext,
    documents: DocumentIndex | None = None,
) -> float:
    """Mean next-token loss over the first ``max_tokens`` tokens of ``tokens`` in non-overlapping windows
    (windows split across the processes of ``info``; None: one process on the model's device). ``documents``
    (the index of ``tokens``): packed documents, as in training with them - the same windows, attention and
    positions restarting at every document."""
    if info is None:
        info = distributed.DistInfo(device=next(model.parameters()).device)
    L = min(seq_len, len(tokens) - 1)
    n_win = max(1, min(max_tokens // L, (len(tokens) - 1) // L))
    mine = list(range(info.rank, n_win, info.world_size))
    total = torch.zeros(2, dtype=torch.float64, device=info.device)  # (sum of losses, tokens)
    was_training = model.training
    model.eval()
    # FSDP: every rank must run the same number of forwards (they are collectives)
    per_rank = math.ceil(n_win / info.world_size)
    n_batches = math.ceil(per_rank / batch_size)
    for b in range(n_batches):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        pad = not idx
        idx = idx or [0]
        w = torch.from_numpy(np.stack([np.asarray(tokens[i * L : i * L + L + 1], dtype=np.int64) for i in idx]))
        w = w.to(info.device)
        pos = None if documents is None else documents.batch_positions([i * L for i in idx], L).to(info.device)
        with autocast():
            logits = logits_of(model(**model_inputs(w[:, :-1], pos)))
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        if not pad:
            total[0] += loss.double()
            total[1] += w[:, 1:].numel()
    distributed.all_reduce_sum(total, info)
    model.train(was_training)
    return float(total[0] / total[1])
