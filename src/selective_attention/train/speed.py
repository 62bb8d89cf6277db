"""Training throughput of vanilla vs SSA models, measured interleaved in one process (fair on a busy machine).

    python -m selective_attention.train.speed --size small --seq-len 256 --batch-size 8 --rounds 5 --steps 3

Each round times ``steps`` full optimizer steps (forward, backward, clipping, AdamW with the temperature group)
of the vanilla model, then of the SSA model; the report gives the median tokens/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from selective_attention.config import SSAConfig
from selective_attention.temperature import param_groups
from selective_attention.train.models import build_model, parameter_counts
from selective_attention.train.trainer import lm_loss


def measure(size: str = "small", vocab: int = 8192, seq_len: int = 256, batch_size: int = 8, rounds: int = 5,
            steps: int = 3, device: str = "cpu", seed: int = 0, memory: bool = False) -> dict:
    dev = torch.device(device)
    models, opts = {}, {}
    for att in ("vanilla", "ssa"):
        m = build_model(size, vocab, seq_len, att, SSAConfig(init="scratch") if att == "ssa" else None, seed).to(dev)
        models[att] = m.train()
        opts[att] = torch.optim.AdamW(param_groups(m, 1e-3, weight_decay=0.1), betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g).to(dev)

    def step(att: str) -> None:
        loss = lm_loss(models[att](input_ids=x[:, :-1]).logits, x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models[att].parameters(), 1.0)
        opts[att].step()
        opts[att].zero_grad(set_to_none=True)

    for att in models:  # warm-up (allocator, kernels)
        step(att)
    rates: dict[str, list[float]] = {"vanilla": [], "ssa": []}
    for _ in range(rounds):
        for att in models:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                step(att)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rates[att].append(steps * batch_size * seq_len / (time.perf_counter() - t))
    med = {att: statistics.median(r) for att, r in rates.items()}
    out = {"size": size, "seq_len": seq_len, "batch_size": batch_size, "device": str(dev),
           "threads": torch.get_num_threads(), "parameters": {a: parameter_counts(m) for a, m in models.items()},
           "tokens_per_s": med, "all_rounds": rates, "ssa_over_vanilla": med["ssa"] / med["vanilla"]}
    if memory:  # one more step each, under the peak-memory tracker (it slows the step: never timed)
        from selective_attention.bench.memory import peak_memory_bytes

        peak = {att: peak_memory_bytes(lambda att=att: step(att), dev) / 2**20 for att in models}
        out["peak_mb"] = peak
        out["ssa_over_vanilla_memory"] = peak["ssa"] / peak["vanilla"]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    r = measure(a.size, seq_len=a.seq_len, batch_size=a.batch_size, rounds=a.rounds, steps=a.steps, device=a.device)
    print(json.dumps(r, indent=2))
    print(f"{a.size}: vanilla {r['tokens_per_s']['vanilla']:,.0f} tokens/s, SSA {r['tokens_per_s']['ssa']:,.0f} "
          f"tokens/s (SSA / vanilla = {r['ssa_over_vanilla']:.3f})")


if __name__ == "__main__":
    main()
