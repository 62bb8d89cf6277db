"""Figure 3: a Markov chain on a vocabulary of 8 tokens, learned by one attention layer, vanilla vs SSA.

Task. A directed graph on K tokens whose nodes have different out-degrees; the next token is uniform over the
out-neighbours of the current one (P*). The model is one attention head whose query is the current token's
embedding and whose keys are the embeddings of all K vocabulary tokens present in the context; the values are
one-hot codes of the key tokens, so the attention row *is* the predicted next-token distribution P^.
SSA adds the library's query temperature (token-aware; default ``sharing="mlp"``, the paper's non-shared variant:
f = W_2 gelu(W_1 x); ``sharing="shared"`` (f = u . gelu(W_q x)) is a setting).

Training (documented design choice). Without any norm control both models reach P* only as ||W|| -> infinity
(the zero entries of P* need logit gaps -> infinity), so "to convergence" needs a budget. Both models minimise
the same objective, the exact expected cross-entropy (rows weighted equally) plus the same L2 penalty
``weight_decay/2 * ||theta||^2`` on every trainable parameter (W_q, W_k and, for SSA, the temperature
function: otherwise tau = 1 + tanh(f) saturates at 2 for every token and says nothing about the degree;
``decay_temperature=False`` shows that), full batch, Adam, to convergence. Token embeddings are fixed
orthonormal vectors (so all norm lives in W = W_q W_k^T).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selective_attention.config import Sharing, SSAConfig
from selective_attention.experiments import common
from selective_attention.functional import selective_attention
from selective_attention.temperature import TemperatureFunction, temperature_parameters

DEFAULT_SEEDS = 3


@dataclass
class Config:
    vocab: int = 8
    out_degrees: tuple[int, ...] = (1, 1, 2, 2, 3, 3, 5, 5)
    graph_seed: int = 0  # the graph is the same for every training seed
    d: int = 16  # embedding / head dimension (>= vocab: values are one-hot codes)
    steps: int = 800
    lr: float = 0.05
    weight_decay: float = 0.01
    init_std: float = 0.3
    sharing: Sharing = "mlp"  # the SSA token term: "mlp" (independent f, the paper's non-shared variant) or "shared"
    decay_temperature: bool = True  # the same L2 penalty on the temperature parameters (see module docstring)


def make_graph(cfg: Config) -> Tensor:
    """P* (K, K): row x uniform over x's out-neighbours (chosen at random, self-loops excluded)."""
    K = cfg.vocab
    if len(cfg.out_degrees) != K or not all(1 <= k <= K - 1 for k in cfg.out_degrees):
        raise ValueError(f"out_degrees needs {K} entries in [1, {K - 1}], got {cfg.out_degrees}")
    g = torch.Generator().manual_seed(cfg.graph_seed)
    P = torch.zeros(K, K, dtype=torch.float64)
    for x, k in enumerate(cfg.out_degrees):
        others = torch.tensor([y for y in range(K) if y != x])
        nbrs = others[torch.randperm(K - 1, generator=g)[:k]]
        P[x, nbrs] = 1.0 / k
    return P


class MarkovAttention(nn.Module):
    """One head: query = E[x] W_q, keys = E W_k for every vocab token, values = one-hot codes -> row = P^."""

    E: Tensor  # buffers, declared for the type checker (nn.Module's attribute lookup is untyped)
    V: Tensor

    def __init__(self, cfg: Config, ssa: bool) -> None:
        super().__init__()
        K, d = cfg.vocab, cfg.d
        if d < K:
            raise ValueError(f"d ({d}) must be >= vocab ({K})")
        # Fixed orthonormal embeddings (unit norm, as in Lemma 1): drawn from the global (seeded) stream.
        E, _ = torch.linalg.qr(torch.randn(d, K))
        self.register_buffer("E", E.T.contiguous())  # (K, d)
        self.W_q = nn.Parameter(torch.randn(d, d) * cfg.init_std / math.sqrt(d))
        self.W_k = nn.Parameter(torch.randn(d, d) * cfg.init_std / math.sqrt(d))
        self.register_buffer("V", torch.eye(K, d))  # value of key token j = e_j, padded to d
        self.temperature: TemperatureFunction | None = None
        if ssa:
            tcfg = SSAConfig(
                query=True,
                value=False,
                token_aware=True,
                position_aware=False,
                sharing=cfg.sharing,
                init="identity",
                mlp_hidden=16 if cfg.sharing == "mlp" else None,
            )
            self.temperature = TemperatureFunction(1, d, d, tcfg)

    def forward(self) -> tuple[Tensor, Tensor]:
        """(P^ (K, K), tau_q (K,)): row x is the attention of query token x over the K keys."""
        K = self.E.shape[0]
        q = (self.E @ self.W_q)[None, None]  # (1, 1, K, d): one query per vocab token
        k = (self.E @ self.W_k)[None, None]  # (1, 1, K, d)
        v = self.V[None, None]  # (1, 1, K, d)
        tau = None
        if self.temperature is not None:
            tau = self.temperature(projection=q, hidden=self.E[None])  # (1, 1, K)
        rows = selective_attention(q, k, v, tau_q=tau, is_causal=False)  # (1, 1, K, d) = P^ padded
        tau_out = tau[0, 0] if tau is not None else torch.ones(K)
        return rows[0, 0, :, :K], tau_out

    def w_norm(self) -> float:
        return float(torch.linalg.matrix_norm(self.W_q @ self.W_k.T, ord=2))


def cross_entropy(P_star: Tensor, P_hat: Tensor) -> Tensor:
    """Mean over rows of -sum_y P*(y|x) log P^(y|x) (nats)."""
    return -(P_star * torch.log(P_hat.clamp_min(1e-30))).sum(-1).mean()


def spikiness(P_hat: Tensor) -> Tensor:
    """Mean over rows of 1 / (L * sum_j s_j^2), L = number of keys (1 = uniform, 1/L = one-hot)."""
    return (1.0 / (P_hat.shape[-1] * (P_hat**2).sum(-1))).mean()


def train_one(cfg: Config, P_star: Tensor, ssa: bool, seed: int) -> tuple[MarkovAttention, list[float]]:
    common.seed_everything(seed)  # same seed -> same embeddings and W init for both methods
    model = MarkovAttention(cfg, ssa)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    target = P_star.float()
    losses = []
    for _ in range(cfg.steps):
        P_hat, _ = model()
        ce = cross_entropy(target, P_hat)
        penalised = [model.W_q, model.W_k]
        if cfg.decay_temperature:
            penalised += temperature_parameters(model)
        loss = ce + 0.5 * cfg.weight_decay * sum(p.square().sum() for p in penalised)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model, losses


@torch.no_grad()
def evaluate(model: MarkovAttention, P_star: Tensor) -> dict[str, Any]:
    P_hat, tau = model()
    P_hat, target = P_hat.double(), P_star
    entropy = -(target * torch.log(target.clamp_min(1e-30))).sum(-1).mean()
    ce = cross_entropy(target, P_hat)
    w = model.w_norm()
    return {
        "metrics": {
            "cross_entropy": float(ce),
            "excess_cross_entropy": float(ce - entropy),  # = mean KL(P* || P^), 0 at the optimum
            "l1_error": float((P_hat - target).abs().sum() / target.shape[0]),
            "spikiness": float(spikiness(P_hat)),
            "w_norm": w,
            "effective_norm": float((tau.double() * w).mean()),
        },
        "P_hat": P_hat.tolist(),
        "tau": tau.tolist(),
    }


def degree_statistics(degrees: list[int], taus: list[list[float]]) -> dict[str, float]:
    """From the learned temperatures (one list per seed): correlation of tau with out-degree, and the mean
    |tau_x - tau_y| over node pairs of equal degree vs of different degree (averaged over seeds)."""
    corr: list[float] = []
    same: list[float] = []
    diff: list[float] = []
    deg = torch.tensor(degrees, dtype=torch.float64)
    for t in taus:
        tt = torch.tensor(t, dtype=torch.float64)
        if tt.std() > 0:
            corr.append(float(torch.corrcoef(torch.stack([deg, tt]))[0, 1]))
        for i in range(len(degrees)):
            for j in range(i + 1, len(degrees)):
                (same if degrees[i] == degrees[j] else diff).append(abs(t[i] - t[j]))
    return {
        "tau_degree_correlation": common.mean_std(corr)[0] if corr else 0.0,
        "tau_gap_equal_degree": common.mean_std(same)[0] if same else math.nan,
        "tau_gap_different_degree": common.mean_std(diff)[0] if diff else math.nan,
    }


def run(out: Path, cfg: Config, seeds: list[int], progress: bool = True) -> dict[str, Any]:
    P_star = make_graph(cfg)
    degrees = [int(k) for k in cfg.out_degrees]
    per_seed, details = [], []
    bar = common.progress(2 * len(seeds), "markov", progress)
    with common.single_thread():
        for seed in seeds:
            row: dict[str, dict[str, float]] = {}
            det: dict[str, Any] = {}
            for method in ("vanilla", "ssa"):
                model, losses = train_one(cfg, P_star, method == "ssa", seed)
                ev = evaluate(model, P_star)
                ev["final_objective_change"] = abs(losses[-1] - losses[-101]) if len(losses) > 100 else math.nan
                row[method], det[method] = ev["metrics"], ev
                bar.update(1)
            per_seed.append(row)
            details.append(det)
    bar.close()
    ssa_taus = [d["ssa"]["tau"] for d in details]
    deg_stats = degree_statistics(degrees, ssa_taus)
    tau_by_degree = {
        str(k): common.mean_std([t[i] for t in ssa_taus for i in range(len(degrees)) if degrees[i] == k])[0]
        for k in sorted(set(degrees))
    }
    extra = {
        "P_star": P_star.tolist(),
        "out_degrees": degrees,
        "tau_by_degree": tau_by_degree,
        **deg_stats,
        "P_hat_seed0": {m: details[0][m]["P_hat"] for m in ("vanilla", "ssa")},
        "tau_per_seed": ssa_taus,
        "w_norm_per_seed": {m: [d[m]["metrics"]["w_norm"] for d in details] for m in ("vanilla", "ssa")},
        "max_objective_change_last_100_steps": max(
            d[m]["final_objective_change"] for d in details for m in ("vanilla", "ssa")
        ),
    }
    results = common.results_dict("markov", cfg, seeds, per_seed, extra)
    results["claims"] = claims(results)
    return common.finish(out, results, figures, summary)


def claims(results: dict[str, Any]) -> dict[str, bool]:
    m, ex = results["methods"], results["extra"]
    taus = [ex["tau_by_degree"][k] for k in sorted(ex["tau_by_degree"], key=int)]
    return {
        "ssa_lower_cross_entropy": m["ssa"]["cross_entropy"] < m["vanilla"]["cross_entropy"],
        "ssa_lower_l1_error": m["ssa"]["l1_error"] < m["vanilla"]["l1_error"],
        "ssa_spikier": m["ssa"]["spikiness"] < m["vanilla"]["spikiness"],
        "ssa_smaller_w_norm": m["ssa"]["w_norm"] < m["vanilla"]["w_norm"],
        "equal_degree_closer_temperature": ex["tau_gap_equal_degree"] < ex["tau_gap_different_degree"],
        "fewer_neighbours_larger_temperature": ex["tau_degree_correlation"] < 0
        and all(a >= b for a, b in zip(taus, taus[1:])),
    }


def figures(out: Path, results: dict[str, Any]) -> None:
    plt = common.pyplot()
    ex = results["extra"]
    P_star = torch.tensor(ex["P_star"])
    K = P_star.shape[0]
    degrees = ex["out_degrees"]

    # (a) the graph
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ang = torch.arange(K) * 2 * math.pi / K
    xy = torch.stack([ang.cos(), ang.sin()], 1)
    for x in range(K):
        for y in range(K):
            if P_star[x, y] > 0:
                ax.annotate(
                    "",
                    xy=xy[y].tolist(),
                    xytext=xy[x].tolist(),
                    arrowprops=dict(
                        arrowstyle="-|>", color="0.4", lw=0.8, shrinkA=11, shrinkB=11, connectionstyle="arc3,rad=0.12"
                    ),
                )
    for x in range(K):
        ax.scatter(*xy[x].tolist(), s=420, color="tab:blue", zorder=3)
        ax.text(*xy[x].tolist(), f"{x}\n(d={degrees[x]})", ha="center", va="center", color="w", fontsize=7, zorder=4)
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("(a) token transition graph (out-degree d)")
    common.save_figure(fig, out / "graph.png")

    # (b, c) P*, P^ vanilla, P^ SSA (seed 0)
    mats = [
        ("(b) P*", P_star),
        ("(c) P^ vanilla", torch.tensor(ex["P_hat_seed0"]["vanilla"])),
        ("(c) P^ SSA", torch.tensor(ex["P_hat_seed0"]["ssa"])),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    for ax, (title, M) in zip(axes, mats):
        im = ax.imshow(M.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("next token (key)")
        ax.set_ylabel("current token (query)")
    fig.colorbar(im, ax=axes, shrink=0.8)
    common.save_figure(fig, out / "transitions.png")

    # temperature per node vs out-degree
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for t in ex["tau_per_seed"]:
        ax.scatter(degrees, t, color="tab:red", alpha=0.5, s=18)
    ks = sorted(ex["tau_by_degree"], key=int)
    ax.plot([int(k) for k in ks], [ex["tau_by_degree"][k] for k in ks], "k-o", label="mean per degree")
    ax.set_xlabel("out-degree of the query token")
    ax.set_ylabel("learned query temperature tau_q(x)")
    ax.set_title(f"corr(tau, degree) = {ex['tau_degree_correlation']:.2f}")
    ax.legend()
    common.save_figure(fig, out / "temperature_vs_degree.png")

    # Figure 2: effective norm tau_q(x) ||W|| (SSA, per token) vs ||W|| (vanilla)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    van = [w for w in ex["w_norm_per_seed"]["vanilla"] for _ in range(K)]
    ssa = [
        t * w
        for t, w in zip(
            [x for t in ex["tau_per_seed"] for x in t], [w for w in ex["w_norm_per_seed"]["ssa"] for _ in range(K)]
        )
    ]
    ssa_w = ex["w_norm_per_seed"]["ssa"]
    bins = 20
    ax.hist(van, bins=bins, alpha=0.6, color="tab:green", label="vanilla ||W||")
    ax.hist(ssa, bins=bins, alpha=0.6, color="tab:red", label="SSA tau_q(x) ||W||")
    ax.axvline(sum(van) / len(van), color="tab:green", ls="--")
    ax.axvline(sum(ssa_w) / len(ssa_w), color="tab:red", ls="--", label="SSA ||W|| (mean)")
    ax.set_xlabel("operator norm")
    ax.set_ylabel("tokens x seeds")
    ax.legend(fontsize=7)
    common.save_figure(fig, out / "norm_histogram.png")


def summary(results: dict[str, Any]) -> str:
    m, ex, c, cfg = results["methods"], results["extra"], results["claims"], results["config"]
    tau_rows = "\n".join(f"| {k} | {ex['tau_by_degree'][k]:.4f} |" for k in sorted(ex["tau_by_degree"], key=int))
    ratio = m["vanilla"]["w_norm"] / m["ssa"]["w_norm"]
    return f"""# markov: Markov chain on {cfg["vocab"]} tokens (paper Figure 3, Figure 2)

One attention head; query = current token, keys = all {cfg["vocab"]} vocabulary tokens, so the attention row is
P^. Out-degrees {tuple(ex["out_degrees"])}, P* uniform over out-neighbours. Both models minimise the exact
expected cross-entropy + the same L2 penalty {cfg["weight_decay"]}/2 ||theta||^2 (W_q, W_k; temperature
parameters too: {cfg["decay_temperature"]}), full batch, Adam,
{cfg["steps"]} steps (objective change over the last 100 steps <= {ex["max_objective_change_last_100_steps"]:.2g}).
SSA = the library's query temperature (token-aware, sharing={cfg["sharing"]}, tau = 1 + tanh(f) in (0, 2)).
Seeds {results["seeds"]} (embeddings and W init per seed; the same for both methods). The embeddings are
orthonormal, so a seed only rotates the problem: every seed converges to the same optimum (std ~ 0).

{
        common.markdown_table(
            m, ["cross_entropy", "excess_cross_entropy", "l1_error", "spikiness", "w_norm", "effective_norm"]
        )
    }

Paper: cross-entropy 0.009 (SSA) vs 0.0126 (vanilla); l1 error 0.358 vs 0.543; vanilla norm ~3x SSA's;
spikiness 0.26 (SSA) vs 0.39 (vanilla). Here: vanilla / SSA norm ratio = {ratio:.2f}.
(Our cross-entropy includes the entropy of P*; `excess_cross_entropy` = KL(P* || P^) is the part a model
can remove. Absolute values depend on the graph and the norm budget, which the paper does not give.)

Learned query temperature per out-degree (mean over nodes and seeds):

| out-degree | tau_q |
|---|---|
{tau_rows}

corr(tau, degree) = {ex["tau_degree_correlation"]:.3f}; mean |tau_x - tau_y| for equal-degree pairs
{ex["tau_gap_equal_degree"]:.4f} vs different-degree pairs {ex["tau_gap_different_degree"]:.4f}.

Claims:
- SSA lower cross-entropy: {common.verdict(c["ssa_lower_cross_entropy"])}
- SSA lower l1 error: {common.verdict(c["ssa_lower_l1_error"])}
- SSA spikier rows (lower spikiness score): {common.verdict(c["ssa_spikier"])}
- SSA smaller ||W_q W_k^T||: {common.verdict(c["ssa_smaller_w_norm"])}
- equal degree -> (closer) equal temperature: {common.verdict(c["equal_degree_closer_temperature"])}
- fewer neighbours -> larger inverse temperature (monotone mean, negative correlation):
  {common.verdict(c["fewer_neighbours_larger_temperature"])}

Figures: graph.png, transitions.png (P*, P^ per method, seed {results["seeds"][0]}), temperature_vs_degree.png,
norm_histogram.png.
"""
