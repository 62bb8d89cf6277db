"""What an adapter tells ``convert`` about one attention module: where its projections and norms are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

# Layouts of a tensor that a temperature multiplies: (B, T, heads * D), (B, T, heads, D) or (B, heads, T, D).
FLAT, BTHD, BHTD = "flat", "bthd", "bhtd"


@dataclass
class Site:
    """One self-attention module and how its q / k / v are produced.

    Modules are named by their attribute on ``attn`` (not held): the hooks re-resolve the name at call time, so
    a projection that is wrapped later (a PEFT LoRA layer) is hooked where the model really calls it.

    - ``separate``: target -> projection attribute whose output (B, T, heads * D) tau is computed from (pre-RoPE).
      Several targets may share one projection (values that are the keys).
    - ``norms``: target -> (norm attribute, layout of its output): the key / value temperature multiplies the
      norm's output (a norm after the projection would erase it), before the KV cache.
    - ``fused``: one projection whose output ``split`` cuts into per-head views (B, T, heads, D) and ``join``
      puts back together ``(out, q, k, v) -> new out``.
    - ``kv_shared``: the layer reads another layer's keys / values (temperatures included): query only.
    """

    attn: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    separate: dict[str, str] = field(default_factory=dict)
    norms: dict[str, tuple[str, str]] = field(default_factory=dict)
    fused: str | None = None
    split: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
    join: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None
    kv_shared: bool = False
    name: str = ""  # module path, for messages

    def heads(self, target: str) -> int:
        return self.n_heads if target == "query" else self.n_kv_heads
