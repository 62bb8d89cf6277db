"""``ssa demo [--quick] [--out DIR] [--seed S]``: SSA against vanilla attention on real text, end to end.

1. trains a vanilla and an SSA model of the same size from scratch on the bundled corpus ("wiki"), same seed,
   same data order, same token budget (``selective_attention.train.trainer.train``);
2. evaluates both on the same validation documents (``selective_attention.evaluate.perplexity``);
3. writes DIR/results.json, DIR/report.html (+ report.md, report.json, figures/*.png) and prints a table.

Budgets (2 CPU cores): the default trains 2 x 600k tokens of the ``tiny`` size (about 5-10 minutes all told),
``--quick`` 2 x 100k tokens (about 1-2 minutes). One seed is one sample: differences smaller than the
seed-to-seed spread (run ``ssa experiment lm`` for several seeds) are not evidence either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError


@dataclasses.dataclass
class DemoConfig:
    data: str = "wiki"
    size: str = "tiny"
    max_tokens: int = 600_000
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    eval_every: int = 40  # optimizer steps
    eval_tokens: int = 16_384
    final_eval_tokens: int = 131_072  # about this many validation tokens for the final perplexity
    vocab_size: int = 8192
    seed: int = 0


QUICK = {"max_tokens": 100_000, "eval_every": 10, "eval_tokens": 8_192, "final_eval_tokens": 32_768}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a ~2 minute run (100k tokens per model)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of both runs (default 0)")
    p.add_argument("--data", default="wiki", help="corpus: wiki (default), sotu, a .txt/.jsonl file or a folder")
    p.add_argument("--size", default="tiny", help="model size (default tiny)")
    p.add_argument("--max-tokens", type=int, default=None, help="training tokens per model (overrides the preset)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _val_documents(data: str, max_tokens: int, tokenizer) -> list[str]:
    """The first validation documents, about ``max_tokens`` tokens of them (the same set for both models)."""
    from selective_attention.data.corpora import load_documents

    docs = load_documents(data, split="val", seed=0)
    out, n = [], 0
    for d in docs:
        out.append(d)
        n += len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1
        if n >= max_tokens:
            break
    return out


def run_demo(cfg: DemoConfig, out: str | Path, progress: bool = True, console: Any = None) -> dict[str, Any]:
    """Train, evaluate, report; returns the results.json content."""
    from rich.console import Console
    from transformers import AutoTokenizer

    from selective_attention.evaluate import perplexity
    from selective_attention.hf import from_pretrained
    from selective_attention.report.builder import build_report
    from selective_attention.train.trainer import TrainConfig, train
    from selective_attention.utils.io import atomic_write_json

    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    methods: dict[str, dict[str, Any]] = {}
    run_dirs = {}
    for i, attention in enumerate(("vanilla", "ssa")):
        console.print(f"[bold][{i + 1}/4] training {attention}[/bold]: {cfg.size} on {cfg.data}, "
                      f"{cfg.max_tokens:,} tokens, seed {cfg.seed}")
        run_dir = out / "runs" / attention
        tc = TrainConfig(data=cfg.data, attention=attention, size=cfg.size, max_tokens=cfg.max_tokens,
                         seed=cfg.seed, out=str(run_dir), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                         lr=cfg.lr, eval_every=cfg.eval_every, eval_tokens=cfg.eval_tokens,
                         vocab_size=cfg.vocab_size, progress=progress, overwrite=True,
                         checkpoint_every=10**9, keep_checkpoints=1)  # a short run: no mid-run checkpoints
        t0 = time.time()
        info = train(tc)
        run_dirs[attention] = run_dir
        methods[attention] = {"train_time_s": time.time() - t0, "run": info}
        console.print(f"      {attention}: final val ppl {info['final_val_ppl']:.2f}, "
                      f"{info['tokens_per_s']:,.0f} tokens/s")

    console.print("[bold][3/4] evaluating both on the same validation documents[/bold]")
    tok = AutoTokenizer.from_pretrained(str(run_dirs["vanilla"] / "final"))
    docs = _val_documents(cfg.data, cfg.final_eval_tokens, tok)
    for attention, d in methods.items():
        model = from_pretrained(str(run_dirs[attention] / "final"))
        ev = perplexity(model, tok, docs, seq_len=cfg.seq_len, batch_size=cfg.batch_size, progress=progress)
        info = d.pop("run")
        params = info["parameters"]
        d.update({"val_ppl": ev["token_ppl"], "val_loss": ev["loss"], "word_ppl": ev["word_ppl"],
                  "bits_per_byte": ev["bits_per_byte"], "eval_tokens": ev["tokens"],
                  "train_final_val_ppl": info["final_val_ppl"], "parameters": int(params["total"]),
                  "new_parameters": int(params["new"]), "parameter_overhead_percent": float(params["percent"]),
                  "tokens_per_s": info["tokens_per_s"], "tokens": info["tokens"], "run_dir": str(run_dirs[attention])})
        del model

    console.print("[bold][4/4] writing the report[/bold]")
    summary = build_report([run_dirs["vanilla"], run_dirs["ssa"]], out,
                           title=f"ssa demo: SSA vs vanilla attention ({cfg.size}, {cfg.data}, "
                                 f"{cfg.max_tokens:,} tokens, seed {cfg.seed})",
                           extra_html=_eval_html(methods), extra_md=_eval_md(methods))
    for m in ("vanilla", "ssa"):
        methods[m]["tokens_to_target"] = summary["methods"][m]["tokens_to_target"]
        methods[m]["speedup"] = summary["methods"][m]["speedup"]
    results = {"demo": dataclasses.asdict(cfg), "seed": cfg.seed, "corpus": cfg.data, "methods": methods,
               "verdict": verdict(methods), "target_val_ppl": summary["target_val_ppl"],
               "report": "report.html", "figures": summary["figures"], "notes": summary["notes"],
               "elapsed_s": time.time() - t_start}
    atomic_write_json(out / "results.json", results)
    return results


def verdict(methods: dict[str, dict[str, Any]]) -> str:
    v, s = methods["vanilla"]["val_ppl"], methods["ssa"]["val_ppl"]
    rel = (s - v) / v * 100
    if abs(rel) < 0.5:
        return f"tie: SSA val ppl {s:.2f} vs vanilla {v:.2f} ({rel:+.2f} %), within 0.5 %"
    word = "lower (SSA better)" if rel < 0 else "higher (SSA worse)"
    return f"SSA val ppl {s:.2f} vs vanilla {v:.2f}: {abs(rel):.2f} % {word}, one seed"


def _rows(methods: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for m, d in methods.items():
        sp = d.get("speedup")
        speed = "1.00x (baseline)" if m == "vanilla" else ("not reached" if sp is None else f"{sp:.2f}x")
        rows.append([m, f"{d['val_ppl']:.2f}", f"{d['word_ppl']:.1f}", f"{d['val_loss']:.4f}",
                     f"{d['parameters']:,}", f"{d['parameter_overhead_percent']:.3f} %",
                     f"{d['tokens_per_s']:,.0f}", speed])
    return rows


HEADER = ["method", "val ppl", "word ppl", "val loss", "parameters", "new params", "tokens/s", "speed-up"]


def _eval_md(methods: dict[str, dict[str, Any]]) -> str:
    lines = ["## Final evaluation (same validation documents for both)", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(methods)]
    return "\n".join(lines)


def _eval_html(methods: dict[str, dict[str, Any]]) -> str:
    import html

    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in _rows(methods))
    return (f"<h2>Final evaluation</h2><p>Both final models on the same validation documents "
            f"({next(iter(methods.values()))['eval_tokens']:,} tokens).</p><table><tr>{head}</tr>{body}</table>"
            f"<p><b>{html.escape(verdict(methods))}</b></p>")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    cfg = DemoConfig(data=args.data, size=args.size, seed=args.seed)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    if args.max_tokens is not None:
        if args.max_tokens < cfg.seq_len * cfg.batch_size:
            raise UserError(f"--max-tokens must be at least one batch ({cfg.seq_len * cfg.batch_size} tokens)")
        steps = math.ceil(args.max_tokens / (cfg.seq_len * cfg.batch_size))
        cfg = dataclasses.replace(cfg, max_tokens=args.max_tokens, eval_every=max(1, steps // 15))
    results = run_demo(cfg, args.out, progress=not args.no_progress)
    table = Table(title=f"ssa demo ({cfg.size}, {cfg.data}, {cfg.max_tokens:,} tokens per model, seed {cfg.seed})")
    for h in HEADER:
        table.add_column(h, justify="left" if h == "method" else "right")
    for r in _rows(results["methods"]):
        table.add_row(*r)
    console = Console()
    console.width = max(console.width, 100)  # a narrow pipe would wrap every cell
    console.print(table)
    console.print(results["verdict"])
    for n in results["notes"]:
        console.print(f"note: {n}")
    console.print(f"results: {Path(args.out) / 'results.json'}   report: {Path(args.out) / 'report.html'}   "
                  f"({results['elapsed_s']:.0f} s)")
    return 0
