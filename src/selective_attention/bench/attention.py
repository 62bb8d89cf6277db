"""Forward+backward time and peak memory of the fused SSA op vs plain SDPA vs the naive materialised form.

Ratios are to SDPA, measured in one run with interleaved repeats (medians), so machine load hits all alike.

Packed documents: ``sdpa_docs`` / ``ssa_docs`` are the same calls with the block-diagonal causal mask of documents
of ~``doc_len`` tokens (``functional.document_mask``, built once per batch outside the timed call, as a model
does for all its layers: a boolean mask on CPU, a flex-attention BlockMask on CUDA). Their ratios are to the same
op without documents: ``ssa_docs_time_ratio = ssa_docs_ms / ssa_ms``, ``sdpa_docs_time_ratio = sdpa_docs_ms /
sdpa_ms`` (and the memory ratios likewise).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from selective_attention.functional import (
    document_mask,
    flex_attend,
    is_block_mask,
    reference_attention,
    selective_attention,
)
from selective_attention.utils.memory import peak_memory_bytes

METHODS = ("sdpa", "ssa", "naive", "sdpa_docs", "ssa_docs")


@dataclass
class AttentionBenchConfig:
    seq_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    batch: int = 2
    heads: int = 12
    head_dim: int = 64
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    naive_max_len: int = 4096  # the naive form needs B*H*T^2 floats several times over
    doc_len: int = 128  # mean document length of the packed-documents rows (0: no such rows)
    seed: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether SDPA forward+backward runs in ``dtype`` on ``device``."""
    try:
        x = torch.randn(1, 1, 4, 8, device=device, dtype=dtype, requires_grad=True)
        F.scaled_dot_product_attention(x, x, x, is_causal=True).sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _steps(
    T: int, cfg: AttentionBenchConfig, dtype: torch.dtype, device: torch.device
) -> dict[str, Callable[[], None]]:
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    shape = (cfg.batch, cfg.heads, T, cfg.head_dim)

    def leaf(*s: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        t = torch.randn(*s, generator=g) * scale + offset
        return t.to(device=device, dtype=dtype).requires_grad_()

    q, k, v = leaf(*shape), leaf(*shape), leaf(*shape)
    tau_q = leaf(cfg.batch, cfg.heads, T, scale=0.1, offset=1.0).float().detach().requires_grad_()
    tau_v = leaf(cfg.batch, cfg.heads, T, scale=0.1, offset=1.0).float().detach().requires_grad_()
    leaves = (q, k, v, tau_q, tau_v)

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            for t in leaves:
                t.grad = None
            fn().float().sum().backward()

        return step

    steps = {
        "sdpa": run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "ssa": run(lambda: selective_attention(q, k, v, tau_q, tau_v, is_causal=True)),
        "naive": run(lambda: _naive(q, k, v, tau_q, tau_v)),
    }
    if cfg.doc_len > 0:
        mask = document_mask(document_ids(cfg.batch, T, cfg.doc_len, g).to(device))  # once per batch, as a model
        if is_block_mask(mask):  # CUDA: flex attention, with and without the temperatures
            steps["sdpa_docs"] = run(lambda: flex_attend(q, k, v, mask))
        else:
            steps["sdpa_docs"] = run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        steps["ssa_docs"] = run(lambda: selective_attention(q, k, v, tau_q, tau_v, attn_mask=mask))
    return steps


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau_q: torch.Tensor, tau_v: torch.Tensor) -> torch.Tensor:
    out = reference_attention(q, k, v, tau_q, tau_v, is_causal=True)
    assert isinstance(out, torch.Tensor)  # a tuple only with return_weights=True
    return out


def document_ids(batch: int, T: int, doc_len: int, g: torch.Generator) -> torch.Tensor:
    """(batch, T) document ids of documents of uniform random length in [doc_len / 2, 3 doc_len / 2]."""
    rows = []
    for _ in range(batch):
        lengths = torch.randint(max(1, doc_len // 2), max(2, 3 * doc_len // 2 + 1), (T,), generator=g)
        rows.append(torch.repeat_interleave(torch.arange(T), lengths)[:T])
    return torch.stack(rows)


def run_attention_bench(cfg: AttentionBenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    device = torch.device(cfg.device)
    rows: list[dict[str, Any]] = []
    for dtype_name in cfg.dtypes:
        dtype = getattr(torch, dtype_name)
        if not dtype_supported(dtype, device):
            rows.append({"dtype": dtype_name, "skipped": f"SDPA backward unsupported in {dtype_name} on {device}"})
            continue
        for T in cfg.seq_lens:
            steps = _steps(T, cfg, dtype, device)
            if T > cfg.naive_max_len:
                steps.pop("naive")
            if progress:
                progress(f"{dtype_name} T={T}")
            times: dict[str, list[float]] = {m: [] for m in steps}
            for i in range(cfg.warmup + cfg.repeats):
                for m, step in steps.items():  # interleaved: every method sees the same machine state
                    _sync(device)
                    t0 = time.perf_counter()
                    step()
                    _sync(device)
                    if i >= cfg.warmup:
                        times[m].append(time.perf_counter() - t0)
            mem = {m: peak_memory_bytes(step, device) for m, step in steps.items()}
            row: dict[str, Any] = {"dtype": dtype_name, "T": T}
            for m in steps:
                row[f"{m}_ms"] = 1e3 * statistics.median(times[m])
                row[f"{m}_peak_mb"] = mem[m] / 2**20
            for m in ("ssa", "naive"):
                if m in steps:
                    row[f"{m}_time_ratio"] = row[f"{m}_ms"] / row["sdpa_ms"]
                    row[f"{m}_memory_ratio"] = row[f"{m}_peak_mb"] / row["sdpa_peak_mb"]
            for m in ("sdpa", "ssa"):  # packed documents: to the same op without them
                if f"{m}_docs" in steps:
                    row[f"{m}_docs_time_ratio"] = row[f"{m}_docs_ms"] / row[f"{m}_ms"]
                    row[f"{m}_docs_memory_ratio"] = row[f"{m}_docs_peak_mb"] / max(row[f"{m}_peak_mb"], 1e-9)
            rows.append(row)
            del steps
    return {
        "benchmark": "attention",
        "config": asdict(cfg),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
