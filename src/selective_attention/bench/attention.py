"""Forward+backward time and peak memory of the fused SSA op vs plain SDPA vs the naive materialised form.

Ratios are to SDPA, measured in one run with interleaved repeats (medians), so machine load hits all alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from selective_attention.functional import reference_attention, selective_attention
from selective_attention.utils.memory import peak_memory_bytes

METHODS = ("sdpa", "ssa", "naive")


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


def _steps(T: int, cfg: AttentionBenchConfig, dtype: torch.dtype, device: torch.device
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

    return {
        "sdpa": run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "ssa": run(lambda: selective_attention(q, k, v, tau_q, tau_v, is_causal=True)),
        "naive": run(lambda: reference_attention(q, k, v, tau_q, tau_v, is_causal=True)),
    }


def run_attention_bench(cfg: AttentionBenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    device = torch.device(cfg.device)
    rows = []
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
            row = {"dtype": dtype_name, "T": T}
            for m in steps:
                row[f"{m}_ms"] = 1e3 * statistics.median(times[m])
                row[f"{m}_peak_mb"] = mem[m] / 2**20
            for m in ("ssa", "naive"):
                if m in steps:
                    row[f"{m}_time_ratio"] = row[f"{m}_ms"] / row["sdpa_ms"]
                    row[f"{m}_memory_ratio"] = row[f"{m}_peak_mb"] / row["sdpa_peak_mb"]
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
