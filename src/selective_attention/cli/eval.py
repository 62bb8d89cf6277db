"""``ssa eval``: perplexity, zero-shot benchmarks and passkey retrieval of one model, as JSON + a printed table.

    ssa eval --model runs/ssa/final --data wiki --tasks perplexity arc_easy piqa passkey --limit 200 --out eval.json

Every input is checked before any work starts; results are written (atomically) only once everything has
run, so a failure never touches an existing output file. The work is ``evaluate.suite.evaluate_model``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError
from selective_attention.evaluate.suite import ALIASES, MODES
from selective_attention.utils.device import choose_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="model directory (HF format, SSA-converted or plain), .gguf file, or "
        "smollm2-135m (the bundled SmolLM2-135M)",
    )
    p.add_argument(
        "--data", default="wiki", help="corpus for perplexity: wiki (default), sotu, a .txt/.jsonl file or a folder"
    )
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="corpus split (default test)")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["perplexity"],
        help=f"any of {', '.join(MODES)}, or zero_shot / arc / all (comma or space separated)",
    )
    p.add_argument(
        "--limit",
        type=str,
        default=None,
        help="at most N examples per zero-shot task and N documents for perplexity (quick runs)",
    )
    p.add_argument("--out", required=True, help="results JSON (the passkey heatmap goes beside it as *_passkey.png)")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: model context, max 1024)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: chunked windows)")
    p.add_argument(
        "--packing",
        default="stitched",
        choices=["stitched", "documents"],
        help="perplexity context: windows across the stream of documents (stitched, default) or each "
        "document alone, at its in-document positions (documents)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="longest input for the zero-shot tasks (default: the model's context; >= 2048 for RoPE)",
    )
    p.add_argument("--passkey-lengths", default="256,512,1024", help="context lengths in tokens (comma separated)")
    p.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1] (comma separated)")
    p.add_argument("--passkey-trials", type=int, default=5, help="trials per length x depth cell")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkey keys")
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="corpus split seed; default: the training run's (DIR/../run.json), else 0",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------- checks


def parse_tasks(items: list[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        for name in filter(None, (s.strip() for s in item.split(","))):
            expanded = ALIASES.get(name, [name])
            bad = [t for t in expanded if t not in MODES]
            if bad:
                raise UserError(f"unknown task {name!r}; known: {', '.join(MODES)} (or zero_shot, arc, all)")
            out.extend(expanded)
    if not out:
        raise UserError("--tasks is empty")
    return list(dict.fromkeys(out))


def parse_limit(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"--limit must be a positive integer, got {value!r}") from None
    if n < 1:
        raise UserError(f"--limit must be a positive integer, got {value!r}")
    return n


def _floats(text: str, name: str) -> list[float]:
    try:
        vals = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise UserError(f"{name} is empty")
    return vals


def parse_passkey(args: argparse.Namespace) -> tuple[list[int], list[float]]:
    lengths = _floats(args.passkey_lengths, "--passkey-lengths")
    if any(x != int(x) or x < 16 for x in lengths):
        raise UserError(f"--passkey-lengths must be integers >= 16, got {args.passkey_lengths!r}")
    depths = _floats(args.passkey_depths, "--passkey-depths")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"--passkey-depths must lie in [0, 1], got {args.passkey_depths!r}")
    if args.passkey_trials < 1:
        raise UserError(f"--passkey-trials must be positive, got {args.passkey_trials}")
    return [int(x) for x in lengths], depths


def check_out(path: str) -> Path:
    out = Path(path)
    if out.is_dir():
        raise UserError(f"--out is a directory, expected a .json file path: {out}")
    if out.suffix.lower() != ".json":
        raise UserError(f"--out must end in .json: {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"--out's parent is not a directory: {parent}")
    return out


def check_sizes(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.seq_len is not None and args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {args.max_length}")
    if args.stride is not None and args.stride < 1:
        raise UserError(f"--stride must be positive, got {args.stride}")


def load_documents(args: argparse.Namespace, split_seed: int, limit: int | None) -> list[str]:
    from selective_attention.data.corpora import load_documents

    documents = load_documents(args.data, args.split, seed=split_seed)
    if not documents:
        raise UserError(f"the {args.split} split of {args.data!r} is empty")
    return documents[:limit] if limit is not None else documents


# ---------------------------------------------------------------------------------------- run


@dataclass
class Checked:
    """What ``ssa eval`` checked and prepared before loading the model."""

    out: Path
    tasks: list[str]
    limit: int | None
    passkey_lengths: list[int]
    passkey_depths: list[float]
    device: str
    split_seed: int
    documents: list[str] | None  # the perplexity corpus (None without the perplexity task)


def check_inputs(args: argparse.Namespace) -> Checked:
    """Every argument, then the corpus (cheaper than the model, so it fails first)."""
    from selective_attention.evaluate.suite import training_split_seed

    out = check_out(args.out)
    tasks = parse_tasks(args.tasks)
    limit = parse_limit(args.limit)
    check_sizes(args)
    lengths, depths = parse_passkey(args) if "passkey" in tasks else ([], [])
    device = str(choose_device(args.device))
    split_seed, documents = 0, None
    if "perplexity" in tasks:
        split_seed = args.split_seed if args.split_seed is not None else training_split_seed(args.model)
        documents = load_documents(args, split_seed, limit)
    return Checked(out, tasks, limit, lengths, depths, device, split_seed, documents)


def load_checked_model(args: argparse.Namespace, checked: Checked) -> tuple[Any, Any]:
    """(model, tokenizer) on the device; the passkey lengths checked against the tokenizer."""
    from selective_attention.evaluate.loading import load_model

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tok = load_model(args.model, checked.device, args.dtype)
    if checked.passkey_lengths:
        from selective_attention.evaluate.passkey import check_lengths

        check_lengths(tok, checked.passkey_lengths)
    return model, tok


def evaluate(args: argparse.Namespace, checked: Checked, model: Any, tok: Any) -> dict[str, Any]:
    from selective_attention.evaluate.suite import evaluate_model

    return evaluate_model(
        model,
        tok,
        checked.tasks,
        name=str(args.model),
        dtype=args.dtype,
        limit=checked.limit,
        documents=checked.documents,
        data=str(args.data),
        split=args.split,
        split_seed=checked.split_seed,
        packing=args.packing,
        seq_len=args.seq_len,
        stride=args.stride,
        batch_size=args.batch_size,
        max_length=args.max_length,
        passkey_lengths=checked.passkey_lengths,
        passkey_depths=checked.passkey_depths,
        passkey_trials=args.passkey_trials,
        seed=args.seed,
        progress=not args.no_progress,
    )


def write_outputs(args: argparse.Namespace, out: Path, result: dict[str, Any], started: float) -> Path | None:
    """The results JSON (and the passkey heatmap beside it, whose path this returns), written atomically."""
    from selective_attention.evaluate.results import write_results

    png = None
    if "passkey" in result:
        png = out.with_name(out.stem + "_passkey.png")
        result["passkey"]["heatmap"] = png.name
    result["elapsed_s"] = time.time() - started
    write_results(out, result, png, heatmap_title=f"Passkey: {Path(args.model).name}")
    return png


def run(args: argparse.Namespace) -> int:
    from selective_attention.evaluate.results import print_tables

    started = time.time()
    checked = check_inputs(args)
    model, tok = load_checked_model(args, checked)
    result = evaluate(args, checked, model, tok)
    png = write_outputs(args, checked.out, result, started)
    print_tables(result)
    print(f"wrote {checked.out}" + (f" and {png}" if png else ""))
    return 0
