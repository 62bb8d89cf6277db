"""The ``ssa`` command line: one module per subcommand in this package, imported only when used.

A subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; it is the only place that parses
arguments: it checks them, then calls the libraries' plain functions with keyword arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("selective_attention.cli.demo", "vanilla vs SSA at the LM study's design (2 seeds), evaluate, report"),
    "train": (
        "selective_attention.cli.train",
        "train or fine-tune a language model (any registered attention method)",
    ),
    "eval": ("selective_attention.cli.eval", "perplexity, zero-shot benchmarks and passkey retrieval"),
    "convert": ("selective_attention.cli.convert", "fit SSA onto a pretrained Hugging Face model"),
    "experiment": ("selective_attention.cli.experiment", "run one of the paper's experiments"),
    "viz": ("selective_attention.cli.viz", "visualise learned temperatures"),
    "report": ("selective_attention.cli.report", "build the HTML/Markdown report of run directories"),
    "bench": ("selective_attention.cli.bench", "speed and memory benchmarks (SSA / vanilla ratios)"),
}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`ssa train: error: ...`) and exit 2; `--help` still prints the full usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ssa", description="Selective Self-Attention (SSA) tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from selective_attention.errors import UserError, first_line

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"ssa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a resumable command says how to resume (INTERRUPTED_HINT)
        hint = getattr(module, "INTERRUPTED_HINT", "")
        print(f"ssa {args.command}: interrupted" + (f": {hint}" if hint else ""), file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for the user; SSA_DEBUG=1 shows it
        if os.environ.get("SSA_DEBUG"):
            raise
        msg = first_line(e)
        print(
            f"ssa {args.command}: error: {type(e).__name__}: {msg} (SSA_DEBUG=1 shows the traceback)", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
