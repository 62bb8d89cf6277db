"""``ssa convert --model PATH_OR_GGUF --out DIR [SSA flags: --sharing shared|mlp, --no-value, ...] [--report]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from selective_attention.cli.ssa_flags import add_ssa_arguments, ssa_config_from_args
from selective_attention.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face model directory, .gguf file, or smollm2-135m (the bundled SmolLM2-135M; offline)",
    )
    p.add_argument("--out", required=True, help="output directory (safetensors + config.json with 'ssa')")
    add_ssa_arguments(p)
    p.add_argument("--report", action="store_true", help="print base / new parameter counts")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an --out directory that an earlier 'ssa convert' wrote (nothing else is removed)",
    )


def format_report(rep: dict, name: str = "") -> str:
    head = f"{name}: " if name else ""
    return (
        f"{head}base {rep['base']:,} parameters, SSA adds {rep['new']:,} "
        f"({rep['percent']:.3f} %), total {rep['total']:,}"
    )


def run(args: argparse.Namespace) -> int:
    from selective_attention.hf import convert, is_converted, load_pretrained, parameter_report
    from selective_attention.hf.save import check_output, save_pretrained

    out = Path(args.out)
    check_output(out, args.force)  # before the (slow) load: refuse early
    try:
        cfg = ssa_config_from_args(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    model, tok = load_pretrained(args.model)
    if is_converted(model):
        raise UserError(f"{args.model} is already SSA-converted")
    try:
        convert(model, cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    rep = parameter_report(model)
    save_pretrained(model, out, tok, force=args.force, json_files={"ssa_parameters.json": rep})
    if args.report:
        print(format_report(rep, type(model).__name__))
    print(f"wrote {out}")
    return 0
