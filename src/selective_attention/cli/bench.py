"""``ssa bench attention`` (the fused op vs SDPA vs naive) and ``ssa bench train`` (training steps)."""

from __future__ import annotations

import argparse

from selective_attention.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    a = sub.add_parser("attention", help="fused SSA op vs SDPA vs naive materialised attention")
    a.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    a.add_argument("--batch", type=int, default=2)
    a.add_argument("--heads", type=int, default=12)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--warmup", type=int, default=1)
    a.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu or cuda")
    a.add_argument("--naive-max-len", type=int, default=4096, help="skip the naive form above this length")
    a.add_argument(
        "--doc-len", type=int, default=128, help="mean document length of the packed-documents rows (0: none)"
    )
    a.add_argument("--out", default="runs/bench/attention.json")
    from selective_attention.bench import train_bench

    # its flags and runner still live in bench/train_bench.py (edited elsewhere): to move here next
    train_bench.add_arguments(sub.add_parser("train", help="training step time and memory, SSA / vanilla"))


def run(args: argparse.Namespace) -> int:
    if args.bench == "train":
        from selective_attention.bench import train_bench

        return train_bench.run(args)
    return run_attention(args)


def run_attention(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from selective_attention.bench.attention import AttentionBenchConfig, run_attention_bench
    from selective_attention.utils.console import table_console
    from selective_attention.utils.device import choose_device
    from selective_attention.utils.io import atomic_write_json

    device = str(choose_device(args.device))
    for name in ("batch", "heads", "head_dim", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.seq_lens) < 1 or args.warmup < 0 or args.doc_len < 0:
        raise UserError("--seq-lens must be >= 1, --warmup and --doc-len >= 0")
    cfg = AttentionBenchConfig(
        seq_lens=args.seq_lens,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        dtypes=args.dtypes,
        repeats=args.repeats,
        warmup=args.warmup,
        device=device,
        naive_max_len=args.naive_max_len,
        doc_len=args.doc_len,
    )
    console = Console(stderr=True)
    with console.status("benchmarking") as status:
        result = run_attention_bench(cfg, progress=lambda s: status.update(f"benchmarking {s}"))
    atomic_write_json(args.out, result)
    table = Table(
        title=f"fwd+bwd, B={cfg.batch} H={cfg.heads} D={cfg.head_dim}, {device}, "
        f"{result['threads']} threads; ratios to SDPA (medians of {cfg.repeats})"
    )
    for col in (
        "dtype",
        "T",
        "SDPA ms",
        "SSA x",
        "naive x",
        "SDPA MB",
        "SSA mem x",
        "naive mem x",
        "docs/causal SDPA x",
        "docs/causal SSA x",
    ):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        if "skipped" in r:
            table.add_row(r["dtype"], "-", r["skipped"], *[""] * 7)
            continue
        ratios = [
            f"{r[k]:.2f}" if k in r else "-"
            for k in (
                "ssa_time_ratio",
                "naive_time_ratio",
                "ssa_memory_ratio",
                "naive_memory_ratio",
                "sdpa_docs_time_ratio",
                "ssa_docs_time_ratio",
            )
        ]
        table.add_row(
            r["dtype"], str(r["T"]), f"{r['sdpa_ms']:.1f}", *ratios[:2], f"{r['sdpa_peak_mb']:.0f}", *ratios[2:]
        )
    table_console().print(table)
    print(f"wrote {args.out}")
    return 0
