"""Model probes: per-token SSA temperatures and attention dilution curves, written as JSON for the report.

``probe_model(model, tokenizer, text)`` measures one loaded model; ``probe_run(run_dir)`` loads ``RUN/final``,
probes it on the run's validation text and writes ``RUN/probe.json`` (atomically), which ``ssa report`` and
``selective_attention.report.builder.build_report`` render without touching a model. ``probe.json``::

    {"format": 2, "settings": {"text", "n_seqs", "seq_len", "model": [[file, bytes, mtime_ns], ...]},
     "tokens": [str] | null,                    the sample text's tokens
     "n_layers": int | null,
     "temperatures": {"query" | "value": {"mean": [T], "per_layer": [[T] * L],      tau     (null: vanilla)
                                         "position": {"mean", "per_layer"},        1 + c log p
                                         "token": {"mean", "per_layer"}}} | null   tanh f(x)
     "dilution": {"position", "entropy", "max_weight", "uniform_entropy": [T]} | null,
     "notes": [str]}                            what could not be measured, and why

Both probes work on any causal LM whose attention ends in ``torch.nn.functional.scaled_dot_product_attention``
(the SSA adapter folds tau_q / tau_v into q / v before that call, transformers' "sdpa" path calls it too):
``capture_attention`` records the q, k and mask of every call and rebuilds the attention probabilities, so the
same code measures vanilla and SSA models without knowing how either is wired.

Format 2 added tau's two terms apart (``position``, ``token``): the position term grows along any text, so a
picture of tau alone mostly shows the position. A format-1 probe.json is probed again (the report still renders
one that cannot be, showing tau).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from selective_attention.errors import UserError
from selective_attention.utils.io import atomic_write_json, read_json
from selective_attention.utils.stats import row_statistics

FORMAT = 2  # 2: tau's position and token terms recorded apart
PROBE_FILE = "probe.json"
SAMPLE_TEXT = (
    "The committee met in the old library on Tuesday. After a long debate about the budget, "
    "the chair proposed a compromise: the museum would stay open, but the new wing would wait "
    "until next year. Everyone agreed, and the meeting ended early."
)


# ----------------------------------------------------------------------------------------------- attention


@contextlib.contextmanager
def capture_attention(rows: list[Tensor]) -> Iterator[None]:
    """Within the block, every SDPA call appends its attention probabilities (B, H, Tq, Tk) (float32, CPU) to
    ``rows`` and still returns the real kernel's output."""
    real = F.scaled_dot_product_attention

    def probe(  # SDPA's own parameter names: callers may pass them by keyword
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        **kw: Any,
    ) -> Tensor:
        out = real(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
            **kw,
        )
        rows.append(_probabilities(query, key, attn_mask, is_causal, scale))
        return out

    F.scaled_dot_product_attention = probe
    torch.nn.functional.scaled_dot_product_attention = probe
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real
        torch.nn.functional.scaled_dot_product_attention = real


@torch.no_grad()
def _probabilities(q: Tensor, k: Tensor, attn_mask: Any, is_causal: bool, scale: float | None) -> Tensor:
    """softmax(scale * q k^T + mask) exactly as SDPA defines it, materialised in float32."""
    q, k = q.float(), k.float()
    H, Hk = q.shape[-3], k.shape[-3]
    if Hk != H:  # GQA: repeat the key heads
        k = k.repeat_interleave(H // Hk, dim=-3)
    Tq, Tk = q.shape[-2], k.shape[-2]
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = s * (q @ k.transpose(-2, -1))  # (B, H, Tq, Tk)
    if is_causal:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()  # SDPA's is_causal: top-left
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):  # a lazy causal-bias object (torch.nn.attention.bias)
            causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
            logits = logits.masked_fill(~causal, float("-inf"))
        elif attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).cpu()


@torch.no_grad()
def dilution_curves(model: torch.nn.Module, input_ids: Tensor) -> dict[str, list[float]] | None:
    """Mean attention entropy and max weight per query position (1-indexed), averaged over layers, heads and
    the batch. None when the model's attention never reaches SDPA (e.g. an eager-only implementation)."""
    rows: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with capture_attention(rows):
            model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    rows = [r for r in rows if r.shape[-2] == r.shape[-1] == input_ids.shape[1]]
    if not rows:
        return None
    stats = [row_statistics(r) for r in rows]
    ent = torch.stack([s["entropy"] for s in stats]).mean(0)
    mx = torch.stack([s["max_weight"] for s in stats]).mean(0)
    T = input_ids.shape[1]
    return {
        "position": list(range(1, T + 1)),
        "entropy": ent.tolist(),
        "max_weight": mx.tolist(),
        "uniform_entropy": [math.log(p) for p in range(1, T + 1)],
    }


# ----------------------------------------------------------------------------------------------- temperatures


@torch.no_grad()
def position_terms(model: torch.nn.Module, n_tokens: int) -> dict[str, Tensor]:
    """The position term 1 + c log p of every layer's query and value temperature at positions p = 1..n_tokens
    (those of one unpadded text, as ``token_temperatures`` runs it), per head: {"query" | "value": (L, H, T)}
    in float32, layers in ``model_temperatures``' order, value heads repeated for GQA like it does; 1 where a
    target has no temperature or no position term."""
    from selective_attention.hf import ssa_state, ssa_temperatures
    from selective_attention.hf.state import converted_attention_modules
    from selective_attention.temperature import TemperatureFunction, log_positions

    out: dict[str, Tensor] = {}
    for target in ("query", "value"):
        layers = []
        for attn in converted_attention_modules(model):
            H = ssa_state(attn).n_heads
            temps = ssa_temperatures(attn)
            fn = temps.fns[target] if target in temps else None
            if isinstance(fn, TemperatureFunction) and fn.position_aware:
                c = fn.position_coefficient().detach().cpu()  # (heads,), the dtype tau is computed in
                logp = log_positions(torch.arange(1, n_tokens + 1), c.dtype)
                term = (1.0 + c[:, None] * logp[None, :]).float()  # tau's own c * log p, then the 1
                if term.shape[0] != H:
                    term = term.repeat_interleave(H // term.shape[0], dim=0)
            else:
                term = torch.ones(H, n_tokens)
            layers.append(term)
        out[target] = torch.stack(layers)
    return out


def _rows(x: Tensor) -> dict[str, list[Any]]:
    """(L, H, T) -> mean over heads per layer and over layers too, as lists."""
    per_layer = x.mean(1)
    return {"mean": per_layer.mean(0).tolist(), "per_layer": per_layer.tolist()}


@torch.no_grad()
def token_temperatures(model: Any, tokenizer: Any, text: str, max_tokens: int = 256) -> dict[str, Any]:
    """Per-token inverse temperatures over ``text`` (its first ``max_tokens`` tokens), mean over heads:
    {"tokens": [str], "n_layers": L, "temperatures": {"query" | "value": {"mean": (T,), "per_layer": (L, T),
    "position": {...}, "token": {...}}}} (lists): tau and its two terms, the position term 1 + c log p and the token
    term tanh f(x) = tau - position term. A target without a temperature reports ones (and a token term of 0).
    ValueError for an empty text or a model that is not SSA-converted."""
    from selective_attention.hf import model_temperatures

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
    if ids.shape[1] == 0:
        raise ValueError("the text has no tokens")
    taus = model_temperatures(model, ids)  # {target: (L, B, H, T)}
    positions = position_terms(model, ids.shape[1])  # {target: (L, H, T)}
    temps = {}
    for target in ("query", "value"):
        tau = taus[target].float()[:, 0]  # (L, H, T)
        per_layer = tau.mean(1)  # (L, T)
        temps[target] = {
            "mean": per_layer.mean(0).tolist(),
            "per_layer": per_layer.tolist(),
            "position": _rows(positions[target]),
            "token": _rows(tau - positions[target]),
        }
    return {
        "tokens": [tokenizer.decode([int(t)]) for t in ids[0]],
        "n_layers": len(temps["query"]["per_layer"]),
        "temperatures": temps,
    }


def has_temperatures(model: torch.nn.Module) -> bool:
    from selective_attention.temperature import temperature_parameters

    return bool(temperature_parameters(model))


def probe_model(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str = SAMPLE_TEXT,
    dilution_ids: Tensor | None = None,
    max_tokens: int = 256,
) -> dict[str, Any]:
    """Probe a loaded model: its per-token temperatures on ``text`` (None for a vanilla model) and, given
    ``dilution_ids`` (B, T), its dilution curves. Whatever cannot be measured becomes a line in "notes"."""
    out: dict[str, Any] = {"tokens": None, "n_layers": None, "temperatures": None, "dilution": None, "notes": []}
    if dilution_ids is not None:
        try:
            out["dilution"] = dilution_curves(model, dilution_ids)
            if out["dilution"] is None:
                out["notes"].append("its attention does not go through SDPA, no dilution curve.")
        except Exception as e:
            out["notes"].append(f"dilution probe failed ({type(e).__name__}: {e}).")
    if has_temperatures(model):
        try:
            out.update(token_temperatures(model, tokenizer, text, max_tokens))
        except Exception as e:
            out["notes"].append(f"no temperature picture ({type(e).__name__}: {e}).")
    return out


# ----------------------------------------------------------------------------------------------- runs


def validation_batch(tok: Any, data: str, n_seqs: int, T: int, fallback: str | None) -> Tensor:
    """(n, T) token ids from the validation split of the run's corpus (the sample text repeated if absent)."""
    text = ""
    try:
        from selective_attention.data.corpora import load_documents

        docs = load_documents(data, split="val", seed=0)
        text = "\n\n".join(docs[:400])
    except Exception:
        text = ""
    if not text:
        text = ((fallback or SAMPLE_TEXT) + " ") * 200
    ids = tok(text[: 20 * n_seqs * T], add_special_tokens=False)["input_ids"]
    while len(ids) < n_seqs * T:
        ids = ids + ids
    return torch.tensor(ids[: n_seqs * T]).view(n_seqs, T)


def _model_stamp(final: Path) -> list[list[Any]]:
    """Name, size and mtime of the model's files: a retrained model invalidates an old probe.json."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(final.iterdir()) if p.is_file()]


def read_probe(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """RUN/probe.json, or None when absent, unreadable or of an older format (it is then probed again)."""
    try:
        obj = read_json(Path(run_dir) / PROBE_FILE)
    except UserError:
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == FORMAT else None


def probe_run(
    run_dir: str | os.PathLike, text: str | None = None, n_seqs: int = 4, seq_len: int = 128, force: bool = False
) -> dict[str, Any]:
    """Probe RUN/final and write RUN/probe.json (see the module docstring); reuse an existing probe.json made
    with the same settings from the same model files unless ``force``. A model that does not load gives a
    probe.json with a note (the report says why it has no figure) rather than an error."""
    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not final.is_dir():
        raise UserError(f"{run_dir} has no final/ model directory to probe")
    settings = {"text": text or SAMPLE_TEXT, "n_seqs": n_seqs, "seq_len": seq_len, "model": _model_stamp(final)}
    old = read_probe(run_dir)
    if old is not None and not force and old.get("settings") == settings:
        return old
    try:
        info = read_json(run_dir / "run.json")
    except UserError:  # the probe needs only the run's corpus and sequence length, which have defaults
        info = {}
    cfg = info.get("config", {}) if isinstance(info, dict) else {}
    try:
        from transformers import AutoTokenizer

        from selective_attention.hf import from_pretrained

        model = from_pretrained(str(final))
        model.eval()
        tok = AutoTokenizer.from_pretrained(str(final))
    except Exception as e:
        result: dict[str, Any] = {
            "tokens": None,
            "n_layers": None,
            "temperatures": None,
            "dilution": None,
            "notes": [f"could not load {final} ({type(e).__name__}: {e})."],
        }
    else:
        T = min(seq_len, int(cfg.get("seq_len") or seq_len))
        ids = validation_batch(tok, cfg.get("data") or "wiki", n_seqs, T, text)
        result = probe_model(model, tok, text or SAMPLE_TEXT, dilution_ids=ids)
    result = {"format": FORMAT, "settings": settings, **result}
    atomic_write_json(run_dir / PROBE_FILE, result)
    return result


def probe_runs(run_dirs: list[str | os.PathLike], text: str | None = None, force: bool = False) -> None:
    """``probe_run`` on every run directory that has a final/ model (the others are left for the report to note)."""
    for d in run_dirs:
        if (Path(d) / "final").is_dir():
            probe_run(d, text=text, force=force)
