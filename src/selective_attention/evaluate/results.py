"""The results of ``ssa eval`` as a table (printed), Markdown and JSON (written atomically, NaN as null)."""

from __future__ import annotations

import math
from pathlib import Path


def write_results(out: Path, result: dict, heatmap_png: Path | None = None, heatmap_title: str = "") -> None:
    """OUT.json, OUT.md and the passkey heatmap (when given), each written atomically."""
    from selective_attention.evaluate.passkey import heatmap
    from selective_attention.utils.io import atomic_write_json, atomic_write_text

    if heatmap_png is not None:
        heatmap(result["passkey"], heatmap_png, title=heatmap_title)
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    atomic_write_json(out, json_safe(result))


def json_safe(obj):  # JSON has no NaN/inf: write null instead
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def summary_rows(result: dict) -> list[tuple[str, str, str]]:
    """(benchmark, metric, value) rows shared by the printed table and the Markdown file."""
    rows = []
    if "perplexity" in result:
        p = result["perplexity"]
        where = f"{p['data']}/{p['split']}" + (" (documents alone)" if p.get("packing") == "documents" else "")
        rows += [
            (f"perplexity {where}", "token ppl", f"{p['token_ppl']:.3f}"),
            (f"perplexity {where}", "word ppl", f"{p['word_ppl']:.3f}"),
            (f"perplexity {where}", "tokens / words", f"{p['tokens']} / {p['words']}"),
        ]
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
    lines = [
        f"# Evaluation of `{result['model']}` ({result['attention']})",
        "",
        "| benchmark | metric | value |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(result)]
    if "passkey" in result:
        header, body = passkey_grid(result["passkey"])
        lines += ["", "## Passkey retrieval accuracy", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        lines += ["", f"![passkey heatmap]({result['passkey']['heatmap']})"]
    return "\n".join(lines) + "\n"


def print_tables(result: dict) -> None:

    from rich.table import Table

    from selective_attention.utils.console import table_console

    console = table_console()
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
        for cells in body:
            g.add_row(*cells)
        console.print(g)
