"""``ssa experiment ablations``: which temperatures, which terms, and SSA against other temperature rules.

One harness for every row (same tiny Llama, data windows, optimizer, steps and seed); only the attention's
temperature differs:

| method       | what multiplies q / k / v                                                              |
|--------------|----------------------------------------------------------------------------------------|
| vanilla      | nothing                                                                                |
| ssa-q/k/v    | SSA's tau(x, p) on the query / key / value only                                        |
| ssa-qv       | query + value (SSA's default: c log p on the query only) | ssa-qkv: all three          |
| ssa-qv-vpos  | query + value, with the c log p term on the value as well                             |
| ssa-token    | query + value, token term tanh(f(x)) only                                              |
| ssa-pos      | position term 1 + c log p only (query; a value temperature needs the token term)       |
| const        | a learned constant per head on q (tau_h, init 1)                                       |
| yarn         | fixed 1 + 0.1 ln p on q (YaRN's 0.1 ln(s) + 1 with s = the visible context length)      |
| ssmax        | Scalable-Softmax: s_h * log p on q, s_h learned per head, init 1 / log(seq_len)         |
| freq         | fixed per-token rule on q from the training corpus frequency: -log f(t) / H (H = the   |
|              | unigram entropy), clamped to [0.25, 4]: rare tokens attend more sharply                 |

The alternative rules are methods/'s (the same classes ``ssa train --attention`` uses): each replaces
SSA's query temperature function inside a converted model (``attn.ssa_temperature.fns["query"]``), so every rule
runs through the same fused path. Scratch initialisation (c = 0.5) for the SSA rows, as for training from scratch.
Every row trains with the project's one loop (``train.loop.fit``) and is scored with ``train.loss.evaluate_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.experiments import common
from selective_attention.methods import Applied, apply_method, parameter_counts
from selective_attention.train.loop import fit
from selective_attention.train.loss import evaluate_loss
from selective_attention.train.optim import OptimConfig, warmup_times_cosine

DEFAULT_SEEDS = 3  # the docs/results.md table (26 min on 2 cores); one seed cannot separate most rows

SSA_ROWS: dict[str, dict[str, Any]] = {
    "ssa-q": {"query": True, "value": False},
    "ssa-k": {"query": False, "value": False, "key": True},
    "ssa-v": {"query": False, "value": True},
    "ssa-qv": {},
    "ssa-qkv": {"key": True},
    "ssa-qv-vpos": {"value_position_aware": True},
    "ssa-token": {"position_aware": False},
    "ssa-pos": {"token_aware": False, "value": False},
}
RULES = ("const", "yarn", "ssmax", "freq")  # the methods registry's query rules, at their default options
ALL_METHODS = ("vanilla", *SSA_ROWS, *RULES)


@dataclass
class Config:
    data: str = "wiki"
    size: str = "tiny"
    methods: tuple[str, ...] = ALL_METHODS
    steps: int = 100
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    temperature_lr: float = 2e-3  # = lr: 10x lr made query+value lose 5 % here (3 seeds)
    warmup: int = 10
    eval_tokens: int = 32_768
    vocab_size: int = 8192
    device: str = "auto"


def build(
    method: str, size: str, vocab: int, seq_len: int, seed: int, train_tokens: np.ndarray | None = None
) -> tuple[nn.Module, Applied]:
    """The model of one row (initialised from ``seed``) and what its method added. ``train_tokens``: the train
    split, for the freq rule's table (over ``vocab`` ids)."""
    from selective_attention.train.models import build_model

    if method not in ALL_METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    model = build_model(size, vocab, seq_len, "vanilla", None, seed)
    if method in SSA_ROWS:
        return model, apply_method(model, "ssa", ssa=SSAConfig(init="scratch", **SSA_ROWS[method]), seq_len=seq_len)
    return model, apply_method(model, method, seq_len=seq_len, train_tokens=train_tokens, vocab=vocab)


def schedule(cfg: Config) -> Callable[[int], float]:
    """This harness's lr multiplier: warmup times a cosine from 1 to 0.1 reached at the last step."""
    return lambda step: warmup_times_cosine(step, cfg.warmup, cfg.steps - 1, 0.1)


def train_one(
    method: str, cfg: Config, seed: int, train_tokens: np.ndarray, val_tokens: np.ndarray, vocab: int
) -> dict[str, float]:
    """Train one row for ``cfg.steps`` steps; return val loss / ppl, parameter counts and speed."""
    T, B = cfg.seq_len, cfg.batch_size
    if len(val_tokens) - 1 < T:
        raise UserError(f"the validation split ({len(val_tokens)} tokens) is shorter than one window of {T}")
    model, applied = build(method, cfg.size, vocab, T, seed, train_tokens)
    g = torch.Generator().manual_seed(10_000 + seed)  # the same windows for every method

    def batches(i: int) -> torch.Tensor:  # (B, T + 1) random windows of the train split
        starts = torch.randint(0, len(train_tokens) - T - 1, (B,), generator=g)
        return torch.stack([torch.from_numpy(train_tokens[s : s + T + 1].astype(np.int64)) for s in starts.tolist()])

    optim = OptimConfig(lr=cfg.lr, temperature_lr=cfg.temperature_lr, weight_decay=0.1, betas=(0.9, 0.95), clip=1.0)
    result = fit(
        model,
        batches,
        cfg.steps,
        optim,
        device=cfg.device,
        schedule=schedule(cfg),
        temperature_params=applied.temperature_parameters,
        evaluate=lambda m: evaluate_loss(m, val_tokens, T, B, cfg.eval_tokens),
    )
    val = result.evals[-1][1]
    counts = parameter_counts(model, applied)
    return {
        "val_loss": val,
        "val_ppl": math.exp(val),
        "new_parameters": float(counts["new"]),
        "overhead_percent": counts["percent"],
        "tokens_per_s": result.tokens_per_s,
    }


def run(out: Path, config: Config, seeds: list[int], progress: bool = True) -> dict[str, Any]:
    from selective_attention.data.tokens import prepare

    unknown = [m for m in config.methods if m not in ALL_METHODS]
    if unknown:
        raise UserError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    if not config.methods:
        raise UserError("no methods to run")
    data = prepare(config.data, "bpe", config.vocab_size, splits=("train", "val"))
    train_tokens = np.asarray(data.tokens("train"))
    val_tokens = np.asarray(data.tokens("val"))
    vocab = len(data.tokenizer)
    per_seed = []
    bar = common.progress(len(seeds) * len(config.methods), "ablations", progress)
    for seed in seeds:
        row: dict[str, dict[str, float]] = {}
        for method in config.methods:
            common.seed_everything(seed)
            bar.set_postfix_str(f"{method} seed {seed}")
            row[method] = train_one(method, config, seed, train_tokens, val_tokens, vocab)
            bar.update(1)
        per_seed.append(row)
    bar.close()
    results = common.results_dict("ablations", config, seeds, per_seed)
    results["config"]["methods"] = list(config.methods)
    common.write_results(out, results)
    _figure(out, results)
    common.write_summary(out, summary(results))
    return results


def summary(results: dict[str, Any]) -> str:
    methods = results["methods"]
    cfg = results["config"]
    lines = [
        f"# Ablations ({cfg['size']} on {cfg['data']}, {cfg['steps']} steps x {cfg['batch_size']} x "
        f"{cfg['seq_len']} tokens, seeds {results['seeds']})",
        "",
        common.markdown_table(methods, ["val_ppl", "val_loss", "overhead_percent", "tokens_per_s"]),
        "",
    ]
    if "vanilla" in methods:
        v = methods["vanilla"]["val_ppl"]
        best = min(methods, key=lambda m: methods[m]["val_ppl"])
        lines.append(f"Best: {best} (val ppl {methods[best]['val_ppl']:.2f}); vanilla {v:.2f}.")
        for m, d in methods.items():
            if m != "vanilla":
                rel = (d["val_ppl"] - v) / v * 100
                lines.append(f"- {m}: {rel:+.2f} % val ppl vs vanilla")
    return "\n".join(lines)


def _figure(out: Path, results: dict[str, Any]) -> None:
    plt = common.pyplot()
    methods = results["methods"]
    names = list(methods)
    vals = [methods[m]["val_ppl"] for m in names]
    errs = [methods[m].get("val_ppl_std", 0.0) for m in names]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(names) + 1))
    colors = ["#7f7f7f" if m == "vanilla" else "#d62728" if m.startswith("ssa") else "#1f77b4" for m in names]
    # points with error bars, not bars: a bar's length from a cut-off axis would exaggerate small differences
    ys = np.arange(len(names))
    for y, v, e, c in zip(ys, vals, errs, colors):
        ax.errorbar(v, y, xerr=e, fmt="o", color=c, ecolor=c, capsize=3)
    if "vanilla" in methods:
        ax.axvline(methods["vanilla"]["val_ppl"], color="#7f7f7f", ls="--", lw=1)
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    lo, hi = min(v - e for v, e in zip(vals, errs)), max(v + e for v, e in zip(vals, errs))
    pad = 0.05 * (hi - lo) + 1e-9
    ax.set_xlim(lo - pad, hi + pad)
    ax.grid(axis="x", alpha=0.3)
    ax.set(xlabel="validation perplexity (lower is better)", title="Ablations: temperature placement and rules")
    common.save_figure(fig, out / "ablations.png")
