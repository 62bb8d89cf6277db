"""Training batches: non-overlapping windows of the train array whose order is a pure function of (seed, global
sample index), so a resumed run and a run on N processes with the same global batch see the same data.

Two packings (``TrainConfig.packing``) of the token array ``doc_1 <eot> doc_2 <eot> ...``:

- ``stitched``: a window is just tokens; attention and positions run across the documents it holds.
- ``documents``: the same windows, each with its tokens' positions inside their documents, so that attention
  restarts at every document (the model's mask is built from the positions) and RoPE / SSA's p are in-document
  positions. A document begins at the <eot> before it (that separator is its first token, as a BOS would be; the
  array's first document begins at 0), so every target is predicted from its own document only. A window that
  starts inside a document continues that document's positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from selective_attention.errors import UserError

PACKINGS = ("stitched", "documents")
_CHUNK = 1 << 24  # tokens scanned at a time for document starts (bounds the temporary boolean array)


class DocumentIndex:
    """Where the documents of a token array begin: at each ``boundary`` token (and at 0)."""

    def __init__(self, tokens: np.ndarray, boundary: int) -> None:
        self.tokens, self.boundary = tokens, int(boundary)
        starts = [
            np.flatnonzero(np.asarray(tokens[i : i + _CHUNK]) == boundary) + i for i in range(0, len(tokens), _CHUNK)
        ]
        self.starts = np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, dtype=np.int64)

    def longest(self) -> int:
        """Tokens of the longest document (its in-document positions run up to this minus 1)."""
        edges = np.concatenate([[0], self.starts, [len(self.tokens)]])
        return int(np.diff(edges).max()) if len(self.tokens) else 0

    def positions(self, start: int, length: int) -> np.ndarray:
        """0-indexed in-document positions (length,) of tokens[start: start + length]."""
        j = int(np.searchsorted(self.starts, start, side="right")) - 1
        first = int(self.starts[j]) if j >= 0 else 0  # where the document holding tokens[start] began
        window = np.asarray(self.tokens[start : start + length])
        idx = np.arange(len(window), dtype=np.int64)
        last = np.maximum.accumulate(np.where(window == self.boundary, idx, -1))  # the latest start in the window
        return np.where(last >= 0, idx - last, start - first + idx)

    def batch_positions(self, starts: Sequence[int], length: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.positions(s, length) for s in starts]))  # (n, length)


class WindowSampler:
    """Non-overlapping seq_len+1 token windows of the train array, reshuffled (order and phase) every epoch.

    ``windows(indices)`` returns the windows of global sample indices; sample g lives in epoch g // n_windows.
    With ``boundary`` (the token that separates documents: ``documents`` packing) ``samples(indices)`` also gives
    each input token its position inside its document; the windows and their order are the same either way.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, boundary: int | None = None) -> None:
        n = len(tokens)
        if n < seq_len + 1:
            raise UserError(
                f"the train split has {n} tokens, fewer than --seq-len + 1 = {seq_len + 1}: "
                "use a larger corpus or a smaller --seq-len"
            )
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.max_phase = seq_len if n >= 2 * seq_len else 1  # a random phase only if it keeps >= 1 window
        self.n_windows = (n - self.max_phase) // seq_len
        self._epoch, self._phase = -1, 0
        self._perm: np.ndarray = np.empty(0, dtype=np.int64)  # the window order of epoch self._epoch
        self.documents = None if boundary is None else DocumentIndex(tokens, boundary)

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n_windows, generator=g).numpy()
            self._phase = int(torch.randint(self.max_phase, (1,), generator=g))
            self._epoch = epoch

    def starts(self, indices: range) -> list[int]:
        """Where the windows of global sample indices begin in the train array."""
        out = []
        for g in indices:
            self._set_epoch(g // self.n_windows)
            out.append(self._phase + int(self._perm[g % self.n_windows]) * self.seq_len)
        return out

    def windows(self, indices: range) -> torch.Tensor:
        rows = [np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in self.starts(indices)]
        return torch.from_numpy(np.stack(rows))  # (n, seq_len + 1)

    def samples(self, indices: range) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training batch of global sample indices: the windows (n, seq_len + 1) when stitched; with documents
        (inputs (n, seq_len), targets (n, seq_len), 0-indexed in-document positions of the inputs (n, seq_len))."""
        if self.documents is None:
            return self.windows(indices)
        starts = self.starts(indices)
        w = torch.from_numpy(
            np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        )  # (n, seq_len + 1)
        return w[:, :-1], w[:, 1:], self.documents.batch_positions(starts, self.seq_len)

    def batches(self, batch_size: int):
        """A batch source for ``loop.fit``: micro-batch i -> samples [i * batch_size, (i + 1) * batch_size)."""
        return lambda i: self.samples(range(i * batch_size, (i + 1) * batch_size))
