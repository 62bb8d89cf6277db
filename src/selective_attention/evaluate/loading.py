"""Loading a model to evaluate: any saved model of any method, a .gguf file or a bundled model's name, checked
for weights that are not finite before any work starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from selective_attention.errors import UserError


def load_model(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a model dir (SSA-converted or plain HF), a .gguf file or a bundled model's name
    (smollm2-135m); a one-line UserError for anything that does not load."""
    import torch

    from selective_attention.hf import load_pretrained
    from selective_attention.utils.packages import resolve_model

    p = resolve_model(path)
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"not a model directory (no config.json): {p}")
    if p.is_dir() and _method_record(p):  # gated, ssmax, llama4, ...: the registry rebuilds its modules
        from transformers import AutoTokenizer

        from selective_attention.methods import load_model as load_method_model

        model = load_method_model(p)
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
        except Exception:  # noqa: BLE001 - no or a broken tokenizer: reported below in one line
            tok = None
    else:
        model, tok = load_pretrained(p)  # a one-line UserError for whatever does not load
    if tok is None:
        raise UserError(f"model directory has no tokenizer: {p}")
    bad = nonfinite_weights(model)
    if bad:
        raise UserError(
            f"cannot evaluate {p}: {len(bad)} weight tensor(s) hold NaN or inf ({short_list(bad)}); "
            "the weights file is corrupt"
        )
    model.to(device=torch.device(device), dtype=getattr(torch, dtype))
    model.eval()
    return model, tok


def _method_record(path: Path) -> dict | None:
    """The ``ssa_method`` record of a saved model of a non-SSA method (None for vanilla / SSA / unreadable)."""
    from selective_attention.methods import METHOD_ATTR

    try:
        return json.loads((path / "config.json").read_text()).get(METHOD_ATTR)
    except (OSError, ValueError):
        return None


def nonfinite_weights(model) -> list[str]:
    """Names of the parameters and buffers that hold a NaN or an infinity."""
    import torch

    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [n for n, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def short_list(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, then how many more: for one-line messages."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
