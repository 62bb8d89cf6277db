"""Peak memory of forward + backward of a stack of attention layers, vanilla / SSA, eager / ``torch.compile``d
(``ssa bench memory``; ``scripts/gpu_check.py memory`` checks its ratios).

The stack is ``layers`` x (LayerNorm, attention, residual), no MLP: the SSA layer is the library's
``SelectiveSelfAttention`` (scratch init, query + value); the vanilla one has the same projections around plain
causal SDPA (the library has no temperature-free layer: an ``SSAConfig`` always has a target). Rows:

- ``vanilla eager``, ``vanilla compiled``, ``ssa eager``, ``ssa compiled``;
- ``ssa eager-no-recompute``: eager SSA keeping every scaled copy and token-term intermediate for backward, what
  the recomputation (saved-tensor hooks, checkpointed token term) saves.

Compiled: inductor on CUDA (allocator statistics). CPU keeps no allocator statistics and its tracker is a dispatch
mode, so there the graphs run with eager kernels after the same min-cut partitioning inductor uses
(``aot_eager_decomp_partition``), the tracker seeing their aten ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.functional import keep_scaled_copies
from selective_attention.layer import SelectiveSelfAttention
from selective_attention.utils.memory import peak_memory_bytes

DTYPES = ("float32", "bfloat16")
MODES = ("eager", "compiled")


@dataclass
class MemoryBenchConfig:
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    batch: int = 4
    seq_len: int = 512
    dtype: str = "float32"
    device: str = "cpu"
    backend: str | None = None  # torch.compile backend; None: inductor on CUDA, aot_eager_decomp_partition on CPU
    compile: bool = True  # False: the eager rows only (no compilation: seconds instead of a minute)


class VanillaAttention(nn.Module):
    """``SelectiveSelfAttention``'s projections (no bias) around plain causal SDPA."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))


class Stack(nn.Module):
    """``layers`` pre-norm residual attention layers, ``attention`` "vanilla" or "ssa"."""

    def __init__(self, attention: str, d: int, heads: int, layers: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.attns = nn.ModuleList(
            VanillaAttention(d, heads)
            if attention == "vanilla"
            else SelectiveSelfAttention(d, heads, config=SSAConfig(init="scratch"))
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return x


def run_memory_bench(cfg: MemoryBenchConfig) -> dict[str, Any]:
    """Peak bytes of one forward + backward (of ``x.float().pow(2).mean()``) per row, after a warm-up step; the
    weights are seeded (0) alike for both attentions. Returns the content of ``ssa bench memory``'s JSON file:
    ``peak_mb`` per row, ``over_vanilla_eager`` per row and ``ssa_over_vanilla`` per mode (eager[, compiled])."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype {cfg.dtype!r}: choose from {', '.join(DTYPES)}")
    if min(cfg.layers, cfg.d_model, cfg.heads, cfg.batch, cfg.seq_len) < 1:
        raise UserError("layers, d_model, heads, batch and seq_len must be >= 1")
    if cfg.d_model % cfg.heads:
        raise UserError(f"d_model ({cfg.d_model}) must be divisible by heads ({cfg.heads})")
    device = torch.device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    backend = cfg.backend or ("inductor" if device.type == "cuda" else "aot_eager_decomp_partition")
    x = torch.randn(cfg.batch, cfg.seq_len, cfg.d_model, device=device, dtype=dtype)
    modes = MODES if cfg.compile else ("eager",)
    peak: dict[str, int] = {}
    for attention in ("vanilla", "ssa"):
        torch.manual_seed(0)
        model = Stack(attention, cfg.d_model, cfg.heads, cfg.layers).to(device=device, dtype=dtype)
        for mode in modes + (("eager-no-recompute",) if attention == "ssa" else ()):
            run_model = torch.compile(model, fullgraph=True, backend=backend) if mode == "compiled" else model

            def work(model: nn.Module = model, run_model: Callable[..., Any] = run_model) -> None:
                model.zero_grad(set_to_none=True)
                run_model(x).float().pow(2).mean().backward()

            with keep_scaled_copies() if mode == "eager-no-recompute" else contextlib.nullcontext():
                torch._dynamo.reset()
                work()  # warm-up (compilation, allocator)
                # a recompilation while measuring would measure eager code: make it an error
                with torch._dynamo.config.patch(error_on_recompile=True):
                    peak[f"{attention} {mode}"] = peak_memory_bytes(work, device, compiled=mode == "compiled")
            model.zero_grad(set_to_none=True)
    return {
        "benchmark": "memory",
        "config": {**asdict(cfg), "backend": backend},
        "device": str(device),
        "torch": torch.__version__,
        "peak_mb": {row: b / 2**20 for row, b in peak.items()},
        "over_vanilla_eager": {row: b / peak["vanilla eager"] for row, b in peak.items()},
        "ssa_over_vanilla": {mode: peak[f"ssa {mode}"] / peak[f"vanilla {mode}"] for mode in modes},
    }
