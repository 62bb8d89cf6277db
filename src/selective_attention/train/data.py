"""Training batches: non-overlapping windows of the train array whose order is a pure function of (seed, global
sample index), so a resumed run and a run on N processes with the same global batch see the same data."""

from __future__ import annotations

import numpy as np
import torch

from selective_attention.errors import UserError


class WindowSampler:
    """Non-overlapping seq_len+1 token windows of the train array, reshuffled (order and phase) every epoch.

    ``windows(indices)`` returns the windows of global sample indices; sample g lives in epoch g // n_windows.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        n = len(tokens)
        if n < seq_len + 1:
            raise UserError(f"the train split has {n} tokens, fewer than --seq-len + 1 = {seq_len + 1}: "
                            "use a larger corpus or a smaller --seq-len")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.max_phase = seq_len if n >= 2 * seq_len else 1  # a random phase only if it keeps >= 1 window
        self.n_windows = (n - self.max_phase) // seq_len
        self._epoch, self._perm, self._phase = -1, None, 0

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n_windows, generator=g).numpy()
            self._phase = int(torch.randint(self.max_phase, (1,), generator=g))
            self._epoch = epoch

    def windows(self, indices: range) -> torch.Tensor:
        rows = []
        for g in indices:
            self._set_epoch(g // self.n_windows)
            start = self._phase + int(self._perm[g % self.n_windows]) * self.seq_len
            rows.append(np.asarray(self.tokens[start: start + self.seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))  # (n, seq_len + 1)

    def batches(self, batch_size: int):
        """A batch source for ``loop.fit``: micro-batch i -> samples [i * batch_size, (i + 1) * batch_size)."""
        return lambda i: self.windows(range(i * batch_size, (i + 1) * batch_size))
