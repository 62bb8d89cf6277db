"""``ssa viz temperatures --model DIR --text "..." --out FILE.{html,png}``: tokens coloured by their learned
SSA temperature, per layer or averaged over layers (heads are always averaged), like the paper's Figure 1."""

from __future__ import annotations

import argparse
from pathlib import Path

from selective_attention.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="viz", metavar="WHAT", required=True)
    t = sub.add_parser("temperatures", help="colour each token of a text by its learned temperature")
    t.add_argument("--model", required=True, help="an SSA model directory (e.g. RUN/final or a converted model)")
    t.add_argument("--text", default=None, help="the text to colour (default: a built-in sample)")
    t.add_argument("--text-file", default=None, help="read the text from this file instead")
    t.add_argument("--out", required=True, help="output file: .html or .png")
    t.add_argument("--target", choices=("query", "value"), default="query", help="which temperature (default query)")
    t.add_argument("--layer", default="mean", help="a layer index (negative counts from the end) or 'mean'")
    t.add_argument("--max-tokens", type=int, default=256, help="truncate the text to this many tokens")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".png"):
        raise UserError(f"--out must end in .html or .png, got {args.out}")
    layer: int | str = args.layer
    if layer != "mean":
        try:
            layer = int(layer)
        except ValueError:
            raise UserError(f"--layer must be an integer or 'mean', got {args.layer!r}") from None
    if args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read --text-file: {e.strerror}: {args.text_file}") from None
    else:
        from selective_attention.report.builder import SAMPLE_TEXT

        text = args.text if args.text is not None else SAMPLE_TEXT
    if not text.strip():
        raise UserError("the text is empty")
    if not Path(args.model).is_dir():
        raise UserError(f"model directory not found: {args.model}")

    from transformers import AutoTokenizer

    from selective_attention.hf import from_pretrained
    from selective_attention.report.analysis import token_temperatures
    from selective_attention.report.viz import write_temperature_html, write_temperature_png
    from selective_attention.temperature import temperature_parameters

    model = from_pretrained(args.model)
    model.eval()
    if not temperature_parameters(model):
        raise UserError(f"{args.model} is a vanilla model: it has no SSA temperatures to show")
    tok = AutoTokenizer.from_pretrained(args.model)
    try:
        t = token_temperatures(model, tok, text, args.target, layer, max_tokens=args.max_tokens)
    except ValueError as e:
        raise UserError(str(e)) from None
    where = "mean over layers" if layer == "mean" else f"layer {layer}"
    title = f"{args.target} inverse temperature per token ({where}, mean over heads): {args.model}"
    if out.suffix.lower() == ".html":
        write_temperature_html(out, t["tokens"], t["values"], title,
                               caption=f"{len(t['tokens'])} tokens, {t['n_layers']} layers")
    else:
        write_temperature_png(out, t["tokens"], t["values"], title=title)
    v = t["values"]
    print(f"{len(v)} tokens, tau_{args.target} from {min(v):.4f} to {max(v):.4f} ({where}); wrote {out}")
    return 0
