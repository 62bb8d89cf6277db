"""``ssa bench train``: training step time and peak memory, SSA / vanilla, measured interleaved in one run."""

from __future__ import annotations

import argparse

from selective_attention.errors import UserError

VOCAB = {"tiny": 8192, "small": 8192, "gpt2-124m": 50257, "pythia-160m": 50304}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", nargs="+", default=["small", "gpt2-124m"], choices=list(VOCAB))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats (medians)")
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per timed repeat")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="runs/bench/train.json")


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from selective_attention.train.speed import measure
    from selective_attention.utils.io import atomic_write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device {device}: not available here")
    for name in ("seq_len", "batch_size", "rounds", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    console = Console(stderr=True)
    results = []
    with console.status("benchmarking") as status:
        for size in args.sizes:
            status.update(f"benchmarking {size}")
            results.append(measure(size, vocab=VOCAB[size], seq_len=args.seq_len, batch_size=args.batch_size,
                                   rounds=args.rounds, steps=args.steps, device=device, memory=True))
    atomic_write_json(args.out, {"benchmark": "train", "device": device, "torch": torch.__version__,
                                 "rows": results})
    table = Table(title=f"training step (fwd+bwd+AdamW), batch {args.batch_size} x {args.seq_len}, {device}; "
                        f"medians of {args.rounds}")
    for col in ("size", "params", "SSA new %", "vanilla tok/s", "SSA tok/s", "SSA/vanilla time", "SSA/vanilla mem"):
        table.add_column(col, justify="right")
    for r in results:
        tps = r["tokens_per_s"]
        table.add_row(r["size"], f"{r['parameters']['vanilla']['total'] / 1e6:.1f}M",
                      f"{r['parameters']['ssa']['percent']:.3f}", f"{tps['vanilla']:,.0f}", f"{tps['ssa']:,.0f}",
                      f"{tps['vanilla'] / tps['ssa']:.3f}", f"{r['ssa_over_vanilla_memory']:.3f}")
    Console().print(table)
    print(f"wrote {args.out}")
    return 0
