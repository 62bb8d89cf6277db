"""``ssa bench attention`` (the fused op vs SDPA vs naive), ``ssa bench train`` (training steps) and ``ssa bench
memory`` (peak memory of a layer stack, eager vs compiled): the flags, their checks and the printed tables; the
measurements are ``selective_attention.bench``'s."""

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
    from selective_attention.bench.train_bench import VOCAB

    t = sub.add_parser("train", help="training step time and memory, SSA / vanilla")
    t.add_argument("--sizes", nargs="+", default=["study", "small"], choices=list(VOCAB))
    t.add_argument("--seq-len", type=int, default=None, help="default: 512 for study (its window), else 256")
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--rounds", type=int, default=3, help="interleaved repeats (medians)")
    t.add_argument("--steps", type=int, default=1, help="optimizer steps per timed repeat")
    t.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu or cuda")
    t.add_argument("--compile", action="store_true", help="also measure torch.compile'd models (same run)")
    t.add_argument("--out", default="runs/bench/train.json")
    m = sub.add_parser("memory", help="peak memory of a stack of attention layers, SSA / vanilla, eager / compiled")
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--d-model", type=int, default=256)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--batch", type=int, default=4)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    m.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu or cuda")
    m.add_argument(
        "--backend",
        default=None,
        help="torch.compile backend (default: inductor on CUDA, aot_eager_decomp_partition on CPU)",
    )
    m.add_argument("--no-compile", action="store_true", help="the eager rows only")
    m.add_argument("--out", default="runs/bench/memory.json")


def run(args: argparse.Namespace) -> int:
    runners = {"attention": run_attention, "train": run_train, "memory": run_memory}
    return runners[args.bench](args)


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


def run_train(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from selective_attention.bench.train_bench import run_train_bench
    from selective_attention.utils.console import table_console
    from selective_attention.utils.device import choose_device
    from selective_attention.utils.io import atomic_write_json

    device = choose_device(args.device)
    for name in ("seq_len", "batch_size", "rounds", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    console = Console(stderr=True)
    with console.status("benchmarking") as status:
        result = run_train_bench(
            args.sizes,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            rounds=args.rounds,
            steps=args.steps,
            device=device,
            compile=args.compile,
            progress=lambda size: status.update(f"benchmarking {size}"),
        )
    atomic_write_json(args.out, result)
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
    for r in result["rows"]:
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


def run_memory(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from selective_attention.bench.memory import MemoryBenchConfig, run_memory_bench
    from selective_attention.utils.console import table_console
    from selective_attention.utils.device import choose_device
    from selective_attention.utils.io import atomic_write_json

    device = choose_device(args.device)
    cfg = MemoryBenchConfig(
        layers=args.layers,
        d_model=args.d_model,
        heads=args.heads,
        batch=args.batch,
        seq_len=args.seq_len,
        dtype=args.dtype,
        device=str(device),
        backend=args.backend,
        compile=not args.no_compile,
    )
    with Console(stderr=True).status("measuring peak memory"):
        result = run_memory_bench(cfg)  # a bad size is its one-line UserError
    atomic_write_json(args.out, result)
    print(_memory_title(result))
    table = Table()
    for col in ("row", "peak MiB", "x vanilla eager"):
        table.add_column(col, justify="right")
    for row, mb in result["peak_mb"].items():
        table.add_row(row, f"{mb:.1f}", f"{result['over_vanilla_eager'][row]:.3f}")
    table_console().print(table)
    print("SSA / vanilla: " + ", ".join(f"{mode} {r:.3f}" for mode, r in result["ssa_over_vanilla"].items()))
    print(f"wrote {args.out}")
    return 0


def _memory_title(result: dict) -> str:
    """The one-line description of a memory bench result (``bench.memory.run_memory_bench``)."""
    c = result["config"]
    return (
        f"peak memory of forward+backward, {c['layers']} layers d={c['d_model']} heads={c['heads']}, batch "
        f"{c['batch']} x {c['seq_len']}, {c['dtype']}, {result['device']}"
        + (f", compiled with {c['backend']}" if c["compile"] else "")
        + ":"
    )
