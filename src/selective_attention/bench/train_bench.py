"""Training step time and peak memory, SSA / vanilla, measured interleaved in one run (``ssa bench train``; its
flags are in ``cli/bench.py``).

Each round times ``steps`` full optimizer steps (``train.loop.train_step``: forward, backward, clipping, AdamW with
the temperature group) of the vanilla model, then of the SSA model, so machine load hits both alike; the report
gives the median tokens/s of each and their ratio, then the peak memory of one more step each. With
``compile=True`` the same is measured again on ``torch.compile``d copies (same weights), in the same run.

    ssa bench train [--sizes study small] [--seq-len T] --batch-size 8 --rounds 5 --steps 3 [--compile]
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.hf import parameter_report
from selective_attention.train.loop import compiled, train_step
from selective_attention.train.models import build_model
from selective_attention.train.optim import OptimConfig, build_optimizer
from selective_attention.utils.device import choose_device
from selective_attention.utils.memory import peak_memory_bytes

VOCAB = {"tiny": 8192, "study": 2048, "small": 8192, "gpt2-124m": 50257, "pythia-160m": 50304}
SEQ_LEN = {"study": 512}  # the LM study's own window; every other size: 256 unless --seq-len says otherwise
ATTENTIONS = ("vanilla", "ssa")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(
    size: str = "small",
    vocab: int = 8192,
    seq_len: int = 256,
    batch_size: int = 8,
    rounds: int = 5,
    steps: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    memory: bool = False,
    compile: bool = False,
) -> dict[str, Any]:
    """{"size", ..., "parameters": {att: counts}, "eager": MODE[, "compiled": MODE]} with
    MODE = {"tokens_per_s": {att: median}, "all_rounds", "ssa_over_vanilla"[, "peak_mb", "ssa_over_vanilla_memory"]};
    the eager mode's keys are also at the top level (the layout of earlier results)."""
    dev = device if isinstance(device, torch.device) else choose_device(device)
    models, opts = {}, {}
    for att in ATTENTIONS:
        m = build_model(size, vocab, seq_len, att, SSAConfig(init="scratch") if att == "ssa" else None, seed).to(dev)
        models[att] = m.train()
        opts[att] = build_optimizer(m, OptimConfig(lr=1e-3, weight_decay=0.1), dev)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(dev)
    out: dict[str, Any] = {
        "size": size,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "parameters": {a: parameter_report(m) for a, m in models.items()},
    }
    out["eager"] = _measure_mode(models, models, opts, x, rounds, steps, dev, memory)
    out.update(out["eager"])
    if compile:
        # the CPU peak tracker is a dispatch mode, under which dynamo runs the model eagerly: a "compiled" peak
        # would silently be the eager one again, so compiled memory is measured on CUDA only (allocator stats)
        out["compiled"] = _measure_mode(
            {a: compiled(m) for a, m in models.items()},
            models,
            opts,
            x,
            rounds,
            steps,
            dev,
            memory and dev.type == "cuda",
        )
    return out


def _measure_mode(
    forward: dict, models: dict, opts: dict, x: torch.Tensor, rounds: int, steps: int, dev: torch.device, memory: bool
) -> dict[str, Any]:
    B, T = x.shape[0], x.shape[1] - 1

    def step(att: str) -> None:
        train_step(forward[att], opts[att], lambda m: x, step=0, params=models[att].parameters())

    for att in forward:  # warm-up (allocator, kernels; the compilation itself)
        step(att)
    rates: dict[str, list[float]] = {att: [] for att in forward}
    for _ in range(rounds):
        for att in forward:
            _sync(dev)
            t = time.perf_counter()
            for _ in range(steps):
                step(att)
            _sync(dev)
            rates[att].append(steps * B * T / (time.perf_counter() - t))
    med = {att: statistics.median(r) for att, r in rates.items()}
    res = {"tokens_per_s": med, "all_rounds": rates, "ssa_over_vanilla": med["ssa"] / med["vanilla"]}
    if memory:  # one more step each, under the peak-memory tracker (it slows the step: never timed)
        peak = {att: peak_memory_bytes(functools.partial(step, att), dev) / 2**20 for att in forward}
        res["peak_mb"] = peak
        res["ssa_over_vanilla_memory"] = peak["ssa"] / peak["vanilla"]
    return res


def run_train_bench(
    sizes: Sequence[str] = ("study", "small"),
    seq_len: int | None = None,
    batch_size: int = 4,
    rounds: int = 3,
    steps: int = 1,
    device: str | torch.device = "auto",
    compile: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``measure`` (with memory) of every size; ``seq_len`` None: each size's own (``SEQ_LEN``, else 256).
    Returns the content of ``ssa bench train``'s JSON file; ``progress(size)`` is called before each size."""
    dev = device if isinstance(device, torch.device) else choose_device(device)
    unknown = [s for s in sizes if s not in VOCAB]
    if unknown:
        raise UserError(f"unknown size {unknown[0]!r}; choose from {', '.join(VOCAB)}")
    rows = []
    for size in sizes:
        if progress:
            progress(size)
        rows.append(
            measure(
                size,
                vocab=VOCAB[size],
                seq_len=seq_len or SEQ_LEN.get(size, 256),
                batch_size=batch_size,
                rounds=rounds,
                steps=steps,
                device=dev,
                memory=True,
                compile=compile,
            )
        )
    return {"benchmark": "train", "device": str(dev), "torch": torch.__version__, "compile": compile, "rows": rows}
