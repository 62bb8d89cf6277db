"""Peak memory of a piece of work: CUDA's allocator statistics on GPU; on CPU (which keeps no such statistics)
a dispatch mode that tracks every storage the work allocates and reports the largest live total."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveStorages(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, _) in list(self.live.items()):  # freed storages first: their addresses get reused
            if ref.expired():
                del self.live[key]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                self.live.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


class _LiveStoragesOfCompiledGraphs(_LiveStorages):
    # dynamo refuses to run under a user dispatch mode: the tracker passes for an "infra" mode so that graphs
    # compiled beforehand run with it seeing their aten ops
    @classmethod
    def is_infra_mode(cls) -> bool:
        return True


def peak_memory_bytes(work: Callable[[], object], device: torch.device, compiled: bool = False) -> int:
    """Bytes allocated by ``work()`` at its peak (inputs that exist beforehand are not counted). ``compiled``:
    ``work`` runs graphs that ``torch.compile`` built before (a recompilation inside would be measured as eager
    code on CPU; the caller should make it an error)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    mode = _LiveStoragesOfCompiledGraphs() if compiled else _LiveStorages()
    with mode:
        work()
    return mode.peak
