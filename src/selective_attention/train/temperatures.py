"""Where a run's temperatures ended, and how far its schedule let them move (``run.json`` "temperatures").

Under Adam(W) a parameter moves by at most about its learning rate per step whatever its gradient, so the sum of a
parameter's learning rates over the run (``lr_sum``) bounds how far it could have gone. A parameter whose largest
change is under 5 % of that bound is reported as not moved: its end value is mostly its start.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from selective_attention.temperature import TemperatureFunction
from selective_attention.train.optim import lr_factor

NOT_MOVED_FRACTION = 0.05


def temperature_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every query / key / value temperature of a converted model (SSA's and the query rules'
    that carry parameters), in model order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if n.split(".")[-2:-1] == ["fns"]
        and any(True for _ in m.parameters(recurse=False))
        and "original_module" not in n.split(".")
    ]


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """The temperature parameters' values now (the start of the run), by parameter name."""
    return {
        f"{n}.{pn}": p.detach().float().cpu().clone()
        for n, m in temperature_modules(model)
        for pn, p in m.named_parameters(recurse=False)
    }


def lr_sum(lr: float, total_steps: int, warmup: int, min_lr_ratio: float) -> float:
    """The sum of the learning rates of a parameter at base rate ``lr`` over the run's schedule."""
    return lr * sum(lr_factor(s, total_steps, warmup, min_lr_ratio) for s in range(total_steps))


def _coefficient(m: nn.Module) -> Tensor | None:
    fn = getattr(m, "position_coefficient", None)
    if fn is None or (isinstance(m, TemperatureFunction) and not m.position_aware):
        return None
    with torch.no_grad():
        return fn().detach().float().cpu()


def summary(
    model: nn.Module,
    start: dict[str, Tensor],
    *,
    temperature_lr: float,
    total_steps: int,
    warmup: int,
    min_lr_ratio: float,
) -> dict[str, Any]:
    """{"lr", "lr_sum", "modules": [{name, target, c, c_reach, params: {name: {moved, start_norm, end_norm}}}],
    "moved": bool}: c per head (per layer for the official form), and for every parameter its largest change
    against the schedule's bound."""
    bound = lr_sum(temperature_lr, total_steps, warmup, min_lr_ratio)
    modules, any_moved = [], False
    for n, m in temperature_modules(model):
        rec: dict[str, Any] = {"name": n, "target": n.split(".")[-1], "kind": type(m).__name__}
        own_start = {pn: start[f"{n}.{pn}"] for pn, _ in m.named_parameters(recurse=False) if f"{n}.{pn}" in start}
        c = _coefficient(m)
        if c is not None:
            rec["c"] = [round(float(v), 6) for v in c]
            reach_of = getattr(m, "coefficient_reach", None)  # every module with a position coefficient has one
            reach = reach_of(own_start, bound) if callable(reach_of) else None
            if reach is not None:
                rec["c_start"], rec["c_reach"] = reach
        params = {}
        for pn, p in m.named_parameters(recurse=False):
            p0 = own_start.get(pn)
            end = p.detach().float().cpu()
            change = float((end - p0).abs().max()) if p0 is not None and p0.shape == end.shape else float("nan")
            moved = change >= NOT_MOVED_FRACTION * bound
            any_moved |= moved
            params[pn] = {"max_change": change, "moved": moved, "end_norm": float(end.norm())}
        rec["params"] = params
        modules.append(rec)
    return {
        "lr": temperature_lr,
        "lr_sum": bound,
        "not_moved_below": NOT_MOVED_FRACTION * bound,
        "modules": modules,
        "moved": any_moved if modules else None,
    }


@torch.no_grad()
def token_spread(model: nn.Module, input_ids: Tensor) -> dict[str, list[float]] | None:
    """Std over tokens of the token term tanh(f(x)) per layer, {"query": [...], "value": [...]}, on one batch
    (None for a model without SSA temperatures). The position term is taken out: it is the same for every token
    at a position, so the spread over tokens at each position is the token term's."""
    from selective_attention.hf import is_converted, model_temperatures

    if not is_converted(model):
        return None
    taus = model_temperatures(model, input_ids)  # {target: (L, B, H, T)}
    # layer: (B, H, T); the std over the batch at each (head, position), averaged
    return {target: [round(float(layer.std(dim=0).mean()), 6) for layer in tau] for target, tau in taus.items()}
