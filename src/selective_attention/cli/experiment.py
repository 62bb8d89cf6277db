"""``ssa experiment NAME --out DIR [--seeds N] [--seed S] [--set KEY=VALUE ...]``: run one registered experiment
(``experiments.registry``) and print its summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from selective_attention.errors import UserError
from selective_attention.experiments.registry import EXPERIMENTS, load, run_experiment


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        choices=list(EXPERIMENTS),
        metavar="NAME",
        help="; ".join(f"{k}: {v[1]}" for k, v in EXPERIMENTS.items()),
    )
    parser.add_argument("--out", required=True, help="output directory (results.json, *.png, summary.md)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the experiment's)")
    parser.add_argument(
        "--budget",
        default=None,
        metavar="NAME",
        help="a preset of the experiment's settings (lm: quick | default | full | search | confirm | packed | "
        "confirm-packed | demo; finetune-study: quick | full; finetune: quick | default | full | cpu); --set applies "
        "on top",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed (seeds are SEED .. SEED+N-1)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting of the experiment's Config (repeatable)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="lm, finetune-study: train N runs at once in separate processes, sharing the CPU threads (default 1)",
    )
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="lm, finetune-study, finetune: rebuild results.json, figures and summary.md from the runs "
        "finished so far; train nothing (read a study in progress)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from selective_attention.experiments.common import parse_overrides

    mod = load(args.name)
    overrides = parse_overrides(args.set, mod.Config)
    if args.seeds is not None and args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    results = run_experiment(
        args.name,
        args.out,
        seeds=args.seeds,
        seed=args.seed,
        progress=not args.no_progress,
        budget=args.budget,
        jobs=args.jobs,
        tables_only=args.tables_only,
        **overrides,
    )
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    print(f"wrote {Path(args.out) / 'results.json'} ({len(results['seeds'])} seeds)")
    return 0
