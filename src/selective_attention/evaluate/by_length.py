"""Perplexity by context length, the regime SSA's position term exists for.

Every window lies inside one document (a window stitched from short unrelated documents would measure
something else), so only corpora with long documents qualify (the State-of-the-Union speeches run to thousands
of tokens each). For each length L the same windows are used for every model sharing a tokenizer:

    windows(L): non-overlapping L + 1 token spans cut from the documents in turn (round robin, so the windows
                come from as many documents as possible), at most ``max_windows`` of them
    ppl(L)    : exp(mean next-token NLL over all L positions of all windows)
    loss_by_position(L): the mean NLL of each of ``buckets`` equal position ranges, early to late
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from selective_attention.errors import UserError


def document_ids(tokenizer, documents: Sequence[str]) -> list[list[int]]:
    """Each document's token ids (no special tokens); empty documents dropped."""
    out = []
    for d in documents:
        ids = tokenizer(d, add_special_tokens=False)["input_ids"]
        if ids:
            out.append(list(ids))
    return out


def length_windows(docs: Sequence[Sequence[int]], length: int, max_windows: int) -> list[list[int]]:
    """Up to ``max_windows`` spans of length + 1 tokens, each inside one document, drawn round robin."""
    spans_per_doc = [[d[s : s + length + 1] for s in range(0, len(d) - length, length)] for d in docs]
    out: list[list[int]] = []
    i = 0
    while len(out) < max_windows and any(i < len(s) for s in spans_per_doc):
        for spans in spans_per_doc:
            if i < len(spans) and len(out) < max_windows:
                out.append(list(spans[i]))
        i += 1
    return out


@torch.no_grad()
def perplexity_by_length(
    model,
    docs: Sequence[Sequence[int]],
    lengths: Sequence[int],
    max_windows: int = 16,
    batch_size: int = 2,
    buckets: int = 8,
) -> dict[str, dict]:
    """{str(L): {"ppl", "loss", "windows", "tokens", "loss_by_position": [buckets floats]}} for each L.

    Raises UserError when the documents are too short for a requested length (no silent shrinking)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result: dict[str, dict] = {}
    try:
        for L in lengths:
            wins = length_windows(docs, int(L), max_windows)
            if not wins:
                longest = max((len(d) for d in docs), default=0)
                raise UserError(
                    f"no document is longer than {L} tokens (longest: {longest}): choose a corpus with "
                    "longer documents or smaller lengths"
                )
            per_pos = torch.zeros(int(L), dtype=torch.float64)
            for i in range(0, len(wins), batch_size):
                x = torch.tensor(wins[i : i + batch_size], dtype=torch.long, device=device)  # (B, L + 1)
                out = model(input_ids=x[:, :-1])
                logits = (out.logits if hasattr(out, "logits") else out).float()  # (B, L, V)
                nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, L)
                if not torch.isfinite(nll).all():
                    raise UserError(f"non-finite loss at length {L}: the model's weights or activations overflow")
                per_pos += nll.double().sum(0).cpu()
            per_pos /= len(wins)
            loss = float(per_pos.mean())
            edges = np.linspace(0, int(L), buckets + 1).astype(int)
            result[str(int(L))] = {
                "ppl": math.exp(loss),
                "loss": loss,
                "windows": len(wins),
                "tokens": len(wins) * int(L),
                "loss_by_position": [float(per_pos[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])],
                "position_edges": [int(e) for e in edges],
            }
    finally:
        model.train(was_training)
    return result


def length_distribution(docs: Sequence[Sequence[int]]) -> dict[str, float]:
    """Document lengths in tokens: count, min, median, max (to state what the windows were cut from)."""
    n = np.array([len(d) for d in docs]) if docs else np.zeros(1)
    return {"documents": len(docs), "min": float(n.min()), "median": float(np.median(n)), "max": float(n.max())}
