"""``ssa demo [--quick] [--out DIR] [--seeds N]``: SSA against vanilla attention on real text, end to end
(``selective_attention.demo.run_demo``; rerunning the same command continues its runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError

# Ctrl-C: the demo's runs keep their checkpoints
INTERRUPTED_HINT = "run the same command again to continue its runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a ~2 minute run (one seed, 82k tokens per model)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 2; --quick 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--max-tokens", type=int, default=None, help="training tokens per model (overrides the preset)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:

    from selective_attention.utils.console import table_console

    overrides: dict[str, Any] = {}
    if args.max_tokens is not None:
        if args.max_tokens < 512 * 8:
            raise UserError("--max-tokens must be at least one batch (4096 tokens)")
        overrides["max_tokens"] = args.max_tokens
    if args.seeds is not None and args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    from selective_attention.demo import run_demo

    results = run_demo(
        args.out, quick=args.quick, seeds=args.seeds, seed=args.seed, progress=not args.no_progress, **overrides
    )
    console = table_console()
    console.print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    console.print(f"[bold]{results['verdict']}[/bold]")
    console.print(
        f"results: {Path(args.out) / 'results.json'}   report: {Path(args.out) / 'report.html'}   "
        f"({results['elapsed_s']:.0f} s)"
    )
    return 0
