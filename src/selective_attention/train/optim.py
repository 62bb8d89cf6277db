"""AdamW with the temperature parameters in their own group, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from selective_attention.temperature import param_groups


@dataclass
class OptimConfig:
    """The optimizer and schedule of a run: AdamW, linear warmup then cosine decay to min_lr_ratio * lr."""

    lr: float = 1e-3
    temperature_lr: float | None = None  # None: lr
    weight_decay: float = 0.1  # matrices only; never the temperatures
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup: int = 0  # optimizer steps
    min_lr_ratio: float = 0.1
    clip: float | None = 1.0  # gradient-norm clipping (None: measured, not clipped)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of every group's base learning rate at optimizer step ``step`` (0-indexed)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_times_cosine(step: int, warmup: int, span: int, min_ratio: float) -> float:
    """The experiments' older schedule: a linear warmup multiplied by a cosine from 1 to ``min_ratio`` over
    ``span`` steps (the two overlap, unlike ``lr_factor``); kept so the ablation and dilution numbers reproduce."""
    ramp = min(1.0, (step + 1) / max(1, warmup))
    return ramp * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step, span) / max(1, span))))


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    device: torch.device | str = "cpu",
    temperature_params: Iterable[nn.Parameter] = (),
) -> torch.optim.AdamW:
    """AdamW over ``temperature.param_groups(model, ...)``; ``temperature_params`` (a method's own temperature
    parameters, e.g. a query rule's) join the temperature group. Each group keeps its ``base_lr`` for the schedule.
    The fused kernel on CUDA."""
    groups = param_groups(model, cfg.lr, cfg.temperature_lr, cfg.weight_decay)
    in_temp = {id(p) for g in groups if g["name"] == "temperature" for p in g["params"]}
    extra = [p for p in temperature_params if id(p) not in in_temp]  # SSA's own are already there
    if extra:
        ids = {id(p) for p in extra}
        for g in groups:
            g["params"] = [p for p in g["params"] if id(p) not in ids]
        temp = next((g for g in groups if g["name"] == "temperature"), None)
        if temp is None:
            t_lr = cfg.lr if cfg.temperature_lr is None else cfg.temperature_lr
            temp = {"params": [], "lr": t_lr, "weight_decay": 0.0, "name": "temperature"}
            groups.insert(0, temp)
        temp["params"] += [p for p in extra if p.requires_grad]
        groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=cfg.betas, eps=cfg.eps, fused=torch.device(device).type == "cuda")


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
