"""``ssa eval``: perplexity, zero-shot benchmarks and passkey retrieval of one model, as JSON + a printed table.

    ssa eval --model runs/ssa/final --data wiki --tasks perplexity arc_easy piqa passkey --limit 200 --out eval.json

Every input is checked before any work starts; results are written (atomically) only once everything has
run, so a failure never touches an existing output file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from selective_attention.errors import UserError
from selective_attention.utils.device import choose_device

ZERO_SHOT = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "lambada"]
ALIASES = {"ppl": ["perplexity"], "zero_shot": ZERO_SHOT, "zero-shot": ZERO_SHOT, "arc": ["arc_easy", "arc_challenge"],
           "all": ["perplexity", *ZERO_SHOT, "passkey"]}
MODES = ["perplexity", "passkey", *ZERO_SHOT]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (HF format, SSA-converted or plain), .gguf file, or "
                   "smollm2-135m (the bundled SmolLM2-135M)")
    p.add_argument("--data", default="wiki", help="corpus for perplexity: wiki (default), sotu, a .txt/.jsonl file "
                                                  "or a folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="corpus split (default test)")
    p.add_argument("--tasks", nargs="+", default=["perplexity"],
                   help=f"any of {', '.join(MODES)}, or zero_shot / arc / all (comma or space separated)")
    p.add_argument("--limit", type=str, default=None,
                   help="at most N examples per zero-shot task and N documents for perplexity (quick runs)")
    p.add_argument("--out", required=True, help="results JSON (the passkey heatmap goes beside it as *_passkey.png)")
    p.add_argument("--seq-len", type=int, default=None, help="perplexity window (default: model context, max 1024)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride (default: chunked windows)")
    p.add_argument("--packing", default="stitched", choices=["stitched", "documents"],
                   help="perplexity context: windows across the stream of documents (stitched, default) or each "
                        "document alone, at its in-document positions (documents)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None,
                   help="longest input for the zero-shot tasks (default: the model's context; >= 2048 for RoPE)")
    p.add_argument("--passkey-lengths", default="256,512,1024", help="context lengths in tokens (comma separated)")
    p.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1] (comma separated)")
    p.add_argument("--passkey-trials", type=int, default=5, help="trials per length x depth cell")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkey keys")
    p.add_argument("--split-seed", type=int, default=None,
                   help="corpus split seed; default: the training run's (DIR/../run.json), else 0")
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


def parse_passkey(args) -> tuple[list[int], list[float]]:
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


# ---------------------------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a model dir (SSA-converted or plain HF), a .gguf file or a bundled model's name
    (smollm2-135m); a one-line UserError for anything that does not load."""
    import torch

    from selective_attention.hf import load_pretrained
    from selective_attention.utils.packages import resolve_model

    p = resolve_model(path)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"not a model directory (no config.json): {p}")
    if p.is_dir() and _method_record(p):  # gated, ssmax, llama4, ...: the registry rebuilds its modules
        from transformers import AutoTokenizer

        from selective_attention.methods import load_model as load_method_model

        model = load_method_model(p)
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
        except Exception:  # noqa: BLE001 - no or a broken tokenizer: reported below in one line
            tok = None
    else:
        model, tok = load_pretrained(p)  # a one-line UserError for whatever does not load
    if tok is None:
        raise UserError(f"model directory has no tokenizer: {p}")
    bad = nonfinite_weights(model)
    if bad:
        raise UserError(f"cannot evaluate {p}: {len(bad)} weight tensor(s) hold NaN or inf ({_names(bad)}); "
                        "the weights file is corrupt")
    model.to(device=torch.device(device), dtype=getattr(torch, dtype))
    model.eval()
    return model, tok


def _method_record(path: Path) -> dict | None:
    """The ``ssa_method`` record of a saved model of a non-SSA method (None for vanilla / SSA / unreadable)."""
    from selective_attention.methods import METHOD_ATTR

    try:
        return json.loads((path / "config.json").read_text()).get(METHOD_ATTR)
    except (OSError, ValueError):
        return None


def nonfinite_weights(model) -> list[str]:
    """Names of the parameters and buffers that hold a NaN or an infinity."""
    import torch

    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _names(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_finite(result: dict, model) -> None:
    """A measured metric that is NaN or infinite is an error naming it and its likely cause, never a result."""
    metrics = {f"perplexity {k}": v for k, v in result.get("perplexity", {}).items()
               if k in ("loss", "token_ppl", "word_ppl")}
    for task, r in result.get("zero_shot", {}).items():
        metrics.update({f"{task} {k}": r[k] for k in ("acc", "acc_norm", "perplexity") if k in r})
    if "passkey" in result:
        metrics["passkey accuracy"] = result["passkey"]["accuracy"]
    bad = [f"{k} = {v}" for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return
    weights = nonfinite_weights(model)
    if weights:
        cause = f"the weights hold NaN or inf ({_names(weights)})"
    else:
        name, p = max(model.named_parameters(), key=lambda kv: float(kv[1].detach().abs().max()))
        cause = (f"the model's outputs overflow in {result.get('dtype', 'its dtype')} (largest weight "
                 f"|{float(p.detach().abs().max()):.3g}| in {name}); are the weights corrupt?")
    raise UserError(f"non-finite result ({_names(bad, 4)}): {cause}")


def split_seed(args) -> int:
    """The split seed the model was trained with, so that its test documents were never trained on."""
    if args.split_seed is not None:
        return args.split_seed
    from selective_attention.utils.packages import resolve_model

    run_json = resolve_model(args.model).parent / "run.json"  # a model in RUN/final
    try:
        return int(json.loads(run_json.read_text())["config"]["split_seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ---------------------------------------------------------------------------------------- run


def run(args) -> int:
    t0 = time.time()
    out = check_out(args.out)
    tasks = parse_tasks(args.tasks)
    limit = parse_limit(args.limit)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.seq_len is not None and args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {args.max_length}")
    if args.stride is not None and args.stride < 1:
        raise UserError(f"--stride must be positive, got {args.stride}")
    lengths, depths = parse_passkey(args) if "passkey" in tasks else ([], [])
    device = str(choose_device(args.device))

    documents = None
    if "perplexity" in tasks:  # the corpus before the model: the cheaper check first
        from selective_attention.data.corpora import load_documents

        documents = load_documents(args.data, args.split, seed=split_seed(args))
        if not documents:
            raise UserError(f"the {args.split} split of {args.data!r} is empty")
        if limit is not None:
            documents = documents[:limit]
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model, tok = load_model(args.model, device, args.dtype)
    if lengths:
        from selective_attention.evaluate.passkey import check_lengths

        check_lengths(tok, lengths)
    progress = not args.no_progress

    result: dict = {"model": str(args.model), "tasks": tasks, "limit": limit, "dtype": args.dtype}
    ssa = getattr(model.config, "ssa", None)
    result["attention"] = "ssa" if ssa else "vanilla"
    if ssa:
        result["ssa"] = ssa
    from selective_attention.hf import parameter_report

    result["parameters"] = parameter_report(model)
    if "perplexity" in tasks:
        from selective_attention.evaluate.perplexity import document_perplexity, perplexity

        score = document_perplexity if args.packing == "documents" else perplexity
        result["perplexity"] = {"data": str(args.data), "split": args.split, "split_seed": split_seed(args),
                                "packing": args.packing,
                                **score(model, tok, documents, seq_len=args.seq_len, batch_size=args.batch_size,
                                        stride=args.stride, progress=progress)}
    zs = [t for t in tasks if t in ZERO_SHOT]
    if zs:
        from selective_attention.evaluate.tasks import zero_shot

        result["zero_shot"] = zero_shot(model, tok, zs, limit=limit, batch_size=args.batch_size,
                                        max_length=args.max_length)
        result["zero_shot_mean_acc"] = sum(r["acc"] for r in result["zero_shot"].values()) / len(zs)
    png = None
    if "passkey" in tasks:
        from selective_attention.evaluate.passkey import passkey

        result["passkey"] = passkey(model, tok, lengths, depths, n_trials=args.passkey_trials, seed=args.seed,
                                    progress=progress)
        png = out.with_name(out.stem + "_passkey.png")
        result["passkey"]["heatmap"] = png.name
    check_finite(result, model)
    result["elapsed_s"] = time.time() - t0

    from selective_attention.evaluate.passkey import heatmap
    from selective_attention.utils.io import atomic_write_json, atomic_write_text

    if png is not None:
        heatmap(result["passkey"], png, title=f"Passkey: {Path(args.model).name}")
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    atomic_write_json(out, _finite(result))
    print_tables(result)
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


def _finite(obj):  # JSON has no NaN/inf: write null instead
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------- reporting


def summary_rows(result: dict) -> list[tuple[str, str, str]]:
    """(benchmark, metric, value) rows shared by the printed table and the Markdown file."""
    rows = []
    if "perplexity" in result:
        p = result["perplexity"]
        where = f"{p['data']}/{p['split']}" + (" (documents alone)" if p.get("packing") == "documents" else "")
        rows += [(f"perplexity {where}", "token ppl", f"{p['token_ppl']:.3f}"),
                 (f"perplexity {where}", "word ppl", f"{p['word_ppl']:.3f}"),
                 (f"perplexity {where}", "tokens / words", f"{p['tokens']} / {p['words']}")]
    for task, r in result.get("zero_shot", {}).items():
        rows.append((task, "acc", f"{r['acc']:.4f} ± {r['acc_stderr']:.4f} (n={r['n']})"))
        if "acc_norm" in r:
            rows.append((task, "acc_norm", f"{r['acc_norm']:.4f}"))
        if "perplexity" in r:
            rows.append((task, "perplexity", f"{r['perplexity']:.3f}"))
    if len(result.get("zero_shot", {})) > 1:
        rows.append(("zero-shot mean", "acc", f"{result['zero_shot_mean_acc']:.4f}"))
    if "passkey" in result:
        rows.append(("passkey", "accuracy", f"{result['passkey']['accuracy']:.3f}"))
    return rows


def passkey_grid(pk: dict) -> tuple[list[str], list[list[str]]]:
    header = ["depth \\ length"] + [str(n) for n in pk["lengths"]]
    acc = {(r["depth"], r["length"]): r["accuracy"] for r in pk["table"]}
    body = [[f"{d:.0%}"] + [f"{acc[(d, n)]:.2f}" for n in pk["lengths"]] for d in pk["depths"]]
    return header, body


def markdown(result: dict) -> str:
    lines = [f"# Evaluation of `{result['model']}` ({result['attention']})", "", "| benchmark | metric | value |",
             "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(result)]
    if "passkey" in result:
        header, body = passkey_grid(result["passkey"])
        lines += ["", "## Passkey retrieval accuracy", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        lines += ["", f"![passkey heatmap]({result['passkey']['heatmap']})"]
    return "\n".join(lines) + "\n"


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"ssa eval: {result['model']} ({result['attention']})")
    for col in ("benchmark", "metric", "value"):
        t.add_column(col)
    for row in summary_rows(result):
        t.add_row(*row)
    console.print(t)
    if "passkey" in result:
        header, body = passkey_grid(result["passkey"])
        g = Table(title="passkey accuracy (depth x context length)")
        for col in header:
            g.add_column(col, justify="right")
        for row in body:
            g.add_row(*row)
        console.print(g)
