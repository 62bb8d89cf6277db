"""Perplexity of a causal LM on a list of documents, token-level and word-level (WikiText-style).

The documents are tokenised one by one and laid end to end in one stream, each preceded by a boundary
token (BOS, else EOS) that is context only, never a target. The stream is cut into windows of ``seq_len``
tokens taken every ``stride`` tokens; each window scores only the tokens no earlier window scored, so every
document token is scored exactly once:

    stride >= seq_len - 1 -> chunked windows (consecutive windows share one token, so every target has context)
    stride <  seq_len - 1 -> sliding windows (each scored token has at least seq_len - stride tokens of context)

    token_ppl = exp(total NLL / number of document tokens)
    word_ppl  = exp(total NLL / number of whitespace-separated words)     (as WikiText reports it)

``document_perplexity`` scores the same tokens with no cross-document context: each document alone (its boundary
token, then its tokens), cut into windows the same way when it is longer than ``seq_len``, at its true
in-document positions (``position_ids``: a later window of a long document continues its positions, as in
training with ``--packing documents``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from selective_attention.errors import UserError


def default_seq_len(model, cap: int = 1024) -> int:
    """The model's context length (from its config), capped so that CPU runs stay cheap."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        n = getattr(cfg, name, None)
        if isinstance(n, int) and n > 0:
            return min(n, cap)
    return cap


def token_stream(tokenizer, documents: Sequence[str]) -> tuple[list[int], list[bool]]:
    """(ids, is_target): the documents end to end, each after a boundary token that is never a target."""
    boundary = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids: list[int] = []
    target: list[bool] = []
    for doc in documents:
        toks = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if not toks:
            continue
        if boundary is not None:
            ids.append(boundary)
            target.append(False)
        ids.extend(toks)
        target.extend([True] * len(toks))
    if boundary is None and target:  # nothing to condition the very first token on: it is context only
        target[0] = False
    return ids, target


def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first, end) per window over a stream of n tokens: input ids[begin:end], targets ids[first:end].

    Targets 1..n-1 are cut into blocks of ``stride``; each block's window reaches back as far as seq_len
    allows (begin = end - seq_len), so every target is scored exactly once and with at least one token of
    context (hence stride <= seq_len - 1).
    """
    out = []
    for first in range(1, n, stride):
        end = min(first + stride, n)
        out.append((max(0, end - seq_len), first, end))
    return out


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    documents: Sequence[str],
    seq_len: int | None = None,
    batch_size: int = 8,
    stride: int | None = None,
    progress: bool = False,
    alone: bool = False,
) -> dict:
    """Token- and word-level perplexity of ``model`` on ``documents`` (``alone``: see ``document_perplexity``).

    Returns {"token_ppl", "word_ppl", "loss" (mean NLL per token, nats), "tokens", "words", "bits_per_byte",
    "seq_len", "stride", "documents"}.
    """
    seq_len, stride = _check_args(model, seq_len, stride, batch_size)
    documents = [d for d in documents if d and d.strip()]
    if not documents:
        raise UserError("no non-empty documents to evaluate perplexity on")

    spans: list[Span] = []
    for stream in [[d] for d in documents] if alone else [documents]:  # one token stream per document, or one
        ids, is_target = token_stream(tokenizer, stream)
        ids_t, tgt_t = torch.tensor(ids, dtype=torch.long), torch.tensor(is_target, dtype=torch.bool)
        spans.extend((ids_t, tgt_t, *w) for w in windows(len(ids), seq_len, stride))
    total_nll, scored = _score(model, tokenizer, spans, batch_size, progress, document_positions=alone)
    summary = _summary(total_nll, scored, documents, seq_len, stride)
    return {**summary, "context": "document"} if alone else summary


def document_perplexity(model, tokenizer, documents: Sequence[str], **kwargs) -> dict:
    """``perplexity`` with every document alone: no window holds tokens of two documents, and positions restart
    at each. The same keys, plus "context": "document"; the same tokens and words are scored."""
    return perplexity(model, tokenizer, documents, alone=True, **kwargs)


Span = tuple[torch.Tensor, torch.Tensor, int, int, int]  # (ids, is_target, begin, first, end) of one window


def _score(
    model, tokenizer, spans: list[Span], batch_size: int, progress: bool, document_positions: bool
) -> tuple[float, int]:
    """(summed NLL, scored targets) over the windows ``spans``, right-padded into batches. ``document_positions``:
    pass each window's positions inside its own token stream (a document alone) as position_ids."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    total_nll = 0.0  # python float: fp64 accumulation
    scored = 0
    bar = _progress(len(spans), progress)
    for i in range(0, len(spans), batch_size):
        chunk = spans[i : i + batch_size]
        T = max(end - begin for _, _, begin, _, end in chunk)
        x = torch.full((len(chunk), T), pad, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        pos = torch.zeros(len(chunk), T, dtype=torch.long)  # in-document positions
        score = torch.zeros(len(chunk), T, dtype=torch.bool)  # which target positions count
        for b, (ids, is_target, begin, first, end) in enumerate(chunk):
            L = end - begin
            x[b, :L] = ids[begin:end]
            mask[b, :L] = 1
            pos[b] = torch.arange(begin, begin + T)  # the pads continue it: a restart would read as a new document
            score[b, first - begin : L] = is_target[first:end]  # earlier tokens are context only
        x, mask, score = x.to(device), mask.to(device), score.to(device)
        kw = {"position_ids": pos.to(device)} if document_positions else {}
        logits = model(input_ids=x, attention_mask=mask, **kw).logits.float()  # (B, T, V)
        # position t predicts token t+1
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # (B, T-1)
        keep = score[:, 1:]
        total_nll += nll[keep].double().sum().item()
        scored += int(keep.sum().item())
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return total_nll, scored


def _check_args(model, seq_len: int | None, stride: int | None, batch_size: int) -> tuple[int, int]:
    seq_len = int(seq_len or default_seq_len(model))
    if seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    stride = min(int(stride or seq_len), seq_len - 1)  # chunked: windows overlap by one token of context
    if stride < 1:
        raise UserError(f"stride must be positive, got {stride}")
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    return seq_len, stride


def _summary(total_nll: float, scored: int, documents: Sequence[str], seq_len: int, stride: int) -> dict:
    # a token is unscored only when it is a boundary, or the stream's first token with no boundary before it
    if scored == 0:
        raise UserError("the documents produced no tokens to score")
    words = sum(len(d.split()) for d in documents)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    loss = total_nll / scored
    return {
        "token_ppl": math.exp(loss),
        "word_ppl": math.exp(total_nll / words),
        "loss": loss,
        "tokens": scored,
        "words": words,
        "bits_per_byte": total_nll / n_bytes / math.log(2),
        "seq_len": seq_len,
        "stride": stride,
        "documents": len(documents),
    }


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="perplexity", unit="window", leave=False)
