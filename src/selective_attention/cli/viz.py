"""``ssa viz temperatures --model DIR --text "..." --out FILE.{html,png}``: tokens coloured by their learned
SSA temperature, per layer or averaged over layers (heads are always averaged), like the paper's Figure 1. The
colour is the token term tanh f(x) by default (``--term``: the position term 1 + c log p or their total tau).

``--model`` probes a model here (``evaluate.probe.probe_model``); ``--probe RUN/probe.json`` (or a run directory
holding one) renders an earlier probe without loading anything. Drawing is ``report.viz.render_temperatures``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="viz", metavar="WHAT", required=True)
    t = sub.add_parser("temperatures", help="colour each token of a text by its learned temperature")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an SSA model directory (e.g. RUN/final or a converted model)")
    src.add_argument("--probe", help="a probe.json written by `ssa report` (or the run directory holding it)")
    t.add_argument("--text", default=None, help="the text to colour (default: a built-in sample; --model only)")
    t.add_argument("--text-file", default=None, help="read the text from this file instead (--model only)")
    t.add_argument("--out", required=True, help="output file: .html or .png")
    t.add_argument("--target", choices=("query", "value"), default="query", help="which temperature (default query)")
    t.add_argument(
        "--term",
        choices=("token", "position", "total"),
        default="token",
        help="colour by the token term tanh f(x) (default), the position term 1 + c log p, or their total tau",
    )
    t.add_argument("--layer", default="mean", help="a layer index (negative counts from the end) or 'mean'")
    t.add_argument("--max-tokens", type=int, default=256, help="truncate the text to this many tokens")


def _text(args: argparse.Namespace) -> str:
    from selective_attention.evaluate.probe import SAMPLE_TEXT

    if args.text_file:
        try:
            text = Path(args.text_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read --text-file: {e.strerror}: {args.text_file}") from None
    else:
        text = args.text if args.text is not None else SAMPLE_TEXT
    if not text.strip():
        raise UserError("the text is empty")
    return text


def _probe_model(args: argparse.Namespace) -> dict[str, Any]:
    text = _text(args)
    if not Path(args.model).is_dir():
        raise UserError(f"model directory not found: {args.model}")
    from transformers import AutoTokenizer

    from selective_attention.evaluate.probe import has_temperatures, token_temperatures
    from selective_attention.hf import from_pretrained

    model = from_pretrained(args.model)
    model.eval()
    if not has_temperatures(model):
        raise UserError(f"{args.model} is a vanilla model: it has no SSA temperatures to show")
    tok = AutoTokenizer.from_pretrained(args.model)
    try:
        return token_temperatures(model, tok, text, max_tokens=args.max_tokens)
    except ValueError as e:
        raise UserError(str(e)) from None


def _read_probe(path: str) -> dict[str, Any]:
    from selective_attention.utils.io import read_json

    p = Path(path)
    if p.is_dir():
        p = p / "probe.json"
    obj = read_json(p, "--probe: a probe.json")
    if not isinstance(obj, dict):
        raise UserError(f"{p}: not a probe.json (expected a JSON object)")
    return obj


def run(args: argparse.Namespace) -> int:
    from selective_attention.report.viz import render_temperatures

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".png"):
        raise UserError(f"--out must end in .html or .png, got {args.out}")
    layer: int | str = args.layer
    if layer != "mean":
        try:
            layer = int(layer)
        except ValueError:
            raise UserError(f"--layer must be an integer or 'mean', got {args.layer!r}") from None
    if args.probe and (args.text is not None or args.text_file):
        raise UserError("--text and --text-file need --model (a probe.json holds the text it was made with)")
    probe = _probe_model(args) if args.model else _read_probe(args.probe)
    print(render_temperatures(probe, out, args.target, layer, source=args.model or args.probe, term=args.term))
    return 0
