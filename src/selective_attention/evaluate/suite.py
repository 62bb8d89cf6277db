"""The evaluation suite of one loaded model (``ssa eval``): perplexity, zero-shot benchmarks and passkey retrieval,
as one result dict; a metric that is not finite is an error naming its likely cause, never a result."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from selective_attention.errors import UserError
from selective_attention.evaluate.loading import nonfinite_weights, short_list

ZERO_SHOT = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "lambada"]
ALIASES = {
    "ppl": ["perplexity"],
    "zero_shot": ZERO_SHOT,
    "zero-shot": ZERO_SHOT,
    "arc": ["arc_easy", "arc_challenge"],
    "all": ["perplexity", *ZERO_SHOT, "passkey"],
}
MODES = ["perplexity", "passkey", *ZERO_SHOT]


def evaluate_model(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    name: str,
    dtype: str,
    limit: int | None = None,
    documents: list[str] | None = None,
    data: str = "wiki",
    split: str = "test",
    split_seed: int = 0,
    packing: str = "stitched",
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    passkey_lengths: Sequence[int] = (),
    passkey_depths: Sequence[float] = (),
    passkey_trials: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``tasks`` (names from ``MODES``) on ``model``; ``documents`` are the perplexity corpus (``data`` /
    ``split`` / ``split_seed`` only describe it in the result). Raises UserError on a non-finite metric."""
    tasks = list(tasks)
    result: dict[str, Any] = {"model": name, "tasks": tasks, "limit": limit, "dtype": dtype}
    ssa = getattr(model.config, "ssa", None)
    result["attention"] = "ssa" if ssa else "vanilla"
    if ssa:
        result["ssa"] = ssa
    from selective_attention.hf import parameter_report

    result["parameters"] = parameter_report(model)
    if "perplexity" in tasks:
        from selective_attention.evaluate.perplexity import document_perplexity, perplexity

        if documents is None:
            raise ValueError("the perplexity task needs documents")
        score = document_perplexity if packing == "documents" else perplexity
        result["perplexity"] = {
            "data": data,
            "split": split,
            "split_seed": split_seed,
            "packing": packing,
            **score(
                model, tokenizer, documents, seq_len=seq_len, batch_size=batch_size, stride=stride, progress=progress
            ),
        }
    zs = [t for t in tasks if t in ZERO_SHOT]
    if zs:
        from selective_attention.evaluate.tasks import zero_shot

        result["zero_shot"] = zero_shot(model, tokenizer, zs, limit=limit, batch_size=batch_size, max_length=max_length)
        result["zero_shot_mean_acc"] = sum(r["acc"] for r in result["zero_shot"].values()) / len(zs)
    if "passkey" in tasks:
        from selective_attention.evaluate.passkey import passkey

        result["passkey"] = passkey(
            model,
            tokenizer,
            list(passkey_lengths),
            list(passkey_depths),
            n_trials=passkey_trials,
            seed=seed,
            progress=progress,
        )
    check_finite(result, model)
    return result


def check_finite(result: dict, model) -> None:
    """A measured metric that is NaN or infinite is an error naming it and its likely cause, never a result."""
    metrics = {
        f"perplexity {k}": v for k, v in result.get("perplexity", {}).items() if k in ("loss", "token_ppl", "word_ppl")
    }
    for task, r in result.get("zero_shot", {}).items():
        metrics.update({f"{task} {k}": r[k] for k in ("acc", "acc_norm", "perplexity") if k in r})
    if "passkey" in result:
        metrics["passkey accuracy"] = result["passkey"]["accuracy"]
    bad = [f"{k} = {v}" for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return
    weights = nonfinite_weights(model)
    if weights:
        cause = f"the weights hold NaN or inf ({short_list(weights)})"
    else:
        name, p = max(model.named_parameters(), key=lambda kv: float(kv[1].detach().abs().max()))
        cause = (
            f"the model's outputs overflow in {result.get('dtype', 'its dtype')} (largest weight "
            f"|{float(p.detach().abs().max()):.3g}| in {name}); are the weights corrupt?"
        )
    raise UserError(f"non-finite result ({short_list(bad, 4)}): {cause}")


def training_split_seed(model: str | os.PathLike) -> int:
    """The split seed ``model`` was trained with (RUN/run.json beside RUN/final), so that its test documents were
    never trained on; 0 when there is no training run to read."""
    from selective_attention.utils.packages import resolve_model

    run_json = resolve_model(model).parent / "run.json"  # a model in RUN/final
    try:
        return int(json.loads(run_json.read_text())["config"]["split_seed"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
