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

The alternative rules are small modules here that replace SSA's query temperature function inside a converted
model (``attn.ssa_temperature.fns["query"]``), so the core code is untouched and every rule runs through the same
fused path. Scratch initialisation (c = 0.5) for the SSA rows, as for training from scratch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.experiments import common
from selective_attention.temperature import SSATemperatures, log_positions, temperature_parameters

DEFAULT_SEEDS = 3  # the README table (26 min on 2 cores); one seed cannot separate most rows

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
RULES = ("const", "yarn", "ssmax", "freq")
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


# ------------------------------------------------------------------------------------ alternative rules


class ConstantTemperature(nn.Module):
    """tau_h: one learned inverse temperature per head, the same for every token and position."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.tau = nn.Parameter(torch.ones(n_heads))

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        T = positions.shape[-1]
        return self.tau.float()[None, :, None].expand(1, -1, T)  # (1, H, T): the same for every token


class YarnTemperature(nn.Module):
    """Fixed 1 + 0.1 ln p (no parameters)."""

    def __init__(self, n_heads: int, coefficient: float = 0.1) -> None:
        super().__init__()
        self.n_heads, self.coefficient = n_heads, coefficient

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        logp = log_positions(positions)
        logp = logp[None] if logp.dim() == 1 else logp  # (B, T)
        return (1.0 + self.coefficient * logp)[:, None, :].expand(-1, self.n_heads, -1)


class ScalableSoftmaxTemperature(nn.Module):
    """Scalable-Softmax: logits times s_h log n, n = keys visible to the query (= its position p)."""

    def __init__(self, n_heads: int, seq_len: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((n_heads,), 1.0 / math.log(max(seq_len, 3))))

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        logp = log_positions(positions)
        logp = logp[None] if logp.dim() == 1 else logp
        # p = 1 gives tau = 0: a single visible key gets weight 1 whatever the logit, so nothing is lost
        return self.s.float()[None, :, None] * logp[:, None, :]


class FrequencyTemperature(nn.Module):
    """Fixed tau(t) from the token's training-corpus frequency; needs the input ids (set by a model pre-hook)."""

    def __init__(self, n_heads: int, table: Tensor) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.register_buffer("table", table.float(), persistent=False)  # (vocab,)
        self.input_ids: Tensor | None = None

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        if self.input_ids is None:
            raise RuntimeError("FrequencyTemperature: no input ids (attach it with install_rule)")
        return self.table[self.input_ids][:, None, :].expand(-1, self.n_heads, -1)  # (B, H, T)


def frequency_table(tokens: np.ndarray, vocab: int, lo: float = 0.25, hi: float = 4.0) -> Tensor:
    """-log f(t) / H per token id, clamped to [lo, hi]; H = sum f log(1/f) (so the corpus average is ~1)."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab).astype(np.float64) + 1.0
    f = counts / counts.sum()
    surprisal = -np.log(f)
    entropy = float((f * surprisal).sum())
    return torch.from_numpy(np.clip(surprisal / entropy, lo, hi)).float()


def install_rule(model: nn.Module, rule: str, seq_len: int, freq_table: Tensor | None = None) -> list[nn.Module]:
    """Replace the query temperature of every SSA layer in a converted ``model`` by ``rule``. Returns the new
    modules (their parameters belong in the temperature optimizer group)."""
    new: list[nn.Module] = []
    for temps in [m for m in model.modules() if isinstance(m, SSATemperatures)]:
        H = temps.fns["query"].n_heads
        if rule == "const":
            fn: nn.Module = ConstantTemperature(H)
        elif rule == "yarn":
            fn = YarnTemperature(H)
        elif rule == "ssmax":
            fn = ScalableSoftmaxTemperature(H, seq_len)
        elif rule == "freq":
            if freq_table is None:
                raise ValueError("the freq rule needs a frequency table")
            fn = FrequencyTemperature(H, freq_table)
        else:
            raise UserError(f"unknown temperature rule {rule!r}: use one of {', '.join(RULES)}")
        temps.fns["query"] = fn
        new.append(fn)
    if rule == "freq":
        freq_modules = [m for m in new if isinstance(m, FrequencyTemperature)]

        def stash_ids(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            for m in freq_modules:
                m.input_ids = ids

        model.register_forward_pre_hook(stash_ids, with_kwargs=True)
    return new


# ------------------------------------------------------------------------------------ harness


def build(method: str, size: str, vocab: int, seq_len: int, seed: int, freq_table: Tensor | None
          ) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model for one row and its temperature parameters."""
    from selective_attention.train.models import build_model

    if method == "vanilla":
        return build_model(size, vocab, seq_len, "vanilla", None, seed), []
    if method in SSA_ROWS:
        cfg = SSAConfig(init="scratch", **SSA_ROWS[method])
        model = build_model(size, vocab, seq_len, "ssa", cfg, seed)
        return model, temperature_parameters(model)
    if method in RULES:
        # a query-only SSA model carries the hooks; its temperature function is then swapped for the rule
        model = build_model(size, vocab, seq_len, "ssa",
                            SSAConfig(init="scratch", value=False, token_aware=False), seed)
        new = install_rule(model, method, seq_len, freq_table)
        return model, [p for m in new for p in m.parameters()]
    raise UserError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train_one(method: str, cfg: Config, seed: int, train_tokens: np.ndarray, val_tokens: np.ndarray, vocab: int,
              freq_table: Tensor | None) -> dict[str, float]:
    """Train one row for ``cfg.steps`` steps; return val loss / ppl, parameter counts and speed."""
    device = _device(cfg.device)
    model, temps = build(method, cfg.size, vocab, cfg.seq_len, seed, freq_table)
    model.to(device).train()
    temp_ids = {id(p) for p in temps}
    base = [p for p in model.parameters() if id(p) not in temp_ids]
    groups = [{"params": [p for p in base if p.dim() >= 2], "lr": cfg.lr, "weight_decay": 0.1},
              {"params": [p for p in base if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0.0}]
    if temps:
        groups.append({"params": temps, "lr": cfg.temperature_lr, "weight_decay": 0.0})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(10_000 + seed)  # the same windows for every method
    T, B = cfg.seq_len, cfg.batch_size
    n_new = sum(p.numel() for p in temps)
    n_total = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        frac = step / max(1, cfg.steps - 1)
        lr_mult = min(1.0, (step + 1) / max(1, cfg.warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for grp in opt.param_groups:
            grp["lr"] = grp["base_lr"] * lr_mult
        starts = torch.randint(0, len(train_tokens) - T - 1, (B,), generator=g)
        x = torch.stack([torch.from_numpy(train_tokens[s: s + T + 1].astype(np.int64)) for s in starts.tolist()])
        x = x.to(device)
        logits = model(input_ids=x[:, :-1]).logits.float()  # (B, T, V)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_s = time.perf_counter() - t0
    val = evaluate(model, val_tokens, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, device)
    return {"val_loss": val, "val_ppl": math.exp(val), "new_parameters": float(n_new),
            "overhead_percent": 100.0 * n_new / max(1, n_total - n_new),
            "tokens_per_s": cfg.steps * B * T / train_s}


@torch.no_grad()
def evaluate(model: nn.Module, tokens: np.ndarray, T: int, B: int, max_tokens: int, device: torch.device) -> float:
    """Mean next-token loss over consecutive windows from the start of the validation split."""
    model.eval()
    n = min(len(tokens) - 1, max_tokens) // T
    if n < 1:
        raise UserError("the validation split is shorter than one window")
    total, count = 0.0, 0
    for i in range(0, n, B):
        rows = [torch.from_numpy(tokens[j * T: j * T + T + 1].astype(np.int64)) for j in range(i, min(n, i + B))]
        x = torch.stack(rows).to(device)
        logits = model(input_ids=x[:, :-1]).logits.float()
        total += nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


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
    freq = frequency_table(train_tokens, vocab) if "freq" in config.methods else None
    per_seed = []
    bar = common.progress(len(seeds) * len(config.methods), "ablations", progress)
    for seed in seeds:
        row: dict[str, dict[str, float]] = {}
        for method in config.methods:
            common.seed_everything(seed)
            bar.set_postfix_str(f"{method} seed {seed}")
            row[method] = train_one(method, config, seed, train_tokens, val_tokens, vocab, freq)
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
    lines = [f"# Ablations ({cfg['size']} on {cfg['data']}, {cfg['steps']} steps x {cfg['batch_size']} x "
             f"{cfg['seq_len']} tokens, seeds {results['seeds']})", "",
             common.markdown_table(methods, ["val_ppl", "val_loss", "overhead_percent", "tokens_per_s"]), ""]
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
