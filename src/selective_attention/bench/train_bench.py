"""``ssa bench train``: training step time and peak memory, SSA / vanilla, measured interleaved in one run.

Each round times ``steps`` full optimizer steps (``train.loop.train_step``: forward, backward, clipping, AdamW with
the temperature group) of the vanilla model, then of the SSA model, so machine load hits both alike; the report
gives the median tokens/s of each and their ratio, then the peak memory of one more step each. With
``--compile`` the same is measured again on ``torch.compile``d copies (same weights), in the same run.

    ssa bench train [--sizes study small] [--seq-len T] --batch-size 8 --rounds 5 --steps 3 [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

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
) -> dict:
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
    out = {
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
) -> dict:
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
        peak = {att: peak_memory_bytes(lambda att=att: step(att), dev) / 2**20 for att in forward}
        res["peak_mb"] = peak
        res["ssa_over_vanilla_memory"] = peak["ssa"] / peak["vanilla"]
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", nargs="+", default=["study", "small"], choices=list(VOCAB))
    p.add_argument("--seq-len", type=int, default=None, help="default: 512 for study (its window), else 256")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats (medians)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per timed repeat")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu or cuda")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd models (same run)")
    p.add_argument("--out", default="runs/bench/train.json")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from selective_attention.utils.console import table_console
    from selective_attention.utils.io import atomic_write_json

    device = choose_device(args.device)
    for name in ("seq_len", "batch_size", "rounds", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    console = Console(stderr=True)
    results = []
    with console.status("benchmarking") as status:
        for size in args.sizes:
            status.update(f"benchmarking {size}")
            seq_len = args.seq_len or SEQ_LEN.get(size, 256)
            results.append(
                measure(
                    size,
                    vocab=VOCAB[size],
                    seq_len=seq_len,
                    batch_size=args.batch_size,
                    rounds=args.rounds,
                    steps=args.steps,
                    device=device,
                    memory=True,
                    compile=args.compile,
                )
            )
    atomic_write_json(
        args.out,
        {
            "benchmark": "train",
            "device": str(device),
            "torch": torch.__version__,
            "compile": args.compile,
            "rows": results,
        },
    )
    table = Table(title=f"training step (fwd+bwd+AdamW), batch {args.batch_size}, {device}; medians of {args.rounds}")
    for col in (
        "size",
        "T",
        "mode",
        "params",
        "SSA new %",
        "vanilla tok/s",
        "SSA tok/s",
        "SSA/vanilla time",
        "SSA/vanilla mem",
    ):
        table.add_column(col, justify="right")
    for r in results:
        for mode in ("eager", "compiled"):
            if mode not in r:
                continue
            d = r[mode]
            tps = d["tokens_per_s"]
            table.add_row(
                r["size"],
                str(r["seq_len"]),
                mode,
                f"{r['parameters']['vanilla']['total'] / 1e6:.1f}M",
                f"{r['parameters']['ssa']['percent']:.3f}",
                f"{tps['vanilla']:,.0f}",
                f"{tps['ssa']:,.0f}",
                f"{tps['vanilla'] / tps['ssa']:.3f}",
                f"{d['ssa_over_vanilla_memory']:.3f}" if "ssa_over_vanilla_memory" in d else "- (CUDA only)",
            )
    table_console().print(table)
    print(f"wrote {args.out}")
    return 0
