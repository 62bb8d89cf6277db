"""The optimisation step and a run-directory-free training loop that any experiment can reuse.

``train_step`` is one optimizer step (micro-batches, gradient accumulation, clipping, divergence check); both
``ssa train`` (train/trainer.py) and ``fit`` call it, so there is one loop body in the project.

``fit(model, batches, steps, OptimConfig(...))`` trains any model whose forward takes ``input_ids`` and returns
``.logits`` or a (B, T, V) tensor, on any batch source ``batches(i) -> (B, T + 1)`` long tensor (i = the
micro-batch index, step * grad_accum + m), with the AdamW + warmup/cosine helpers of train/optim.py, and writes
nothing to disk. A batch may also be a pair (inputs (B, T), targets (B, T)) whose targets -100 carry no loss
(``F.cross_entropy``'s ignore_index): a task that scores only some positions, e.g. the answer of a retrieval task;
or a triple (inputs, targets, positions (B, T)) of packed documents (``data.WindowSampler`` with documents): the
0-indexed in-document positions go to the model as ``position_ids``, from which transformers builds the
block-diagonal causal mask (once per forward; sdpa: a boolean (B, 1, T, T) mask) - see ``loss.model_inputs``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from selective_attention.errors import UserError
from selective_attention.train import loss as L
from selective_attention.train.loss import model_inputs
from selective_attention.train.optim import OptimConfig, build_optimizer, lr_factor, set_lr
from selective_attention.utils.device import choose_device


class Diverged(UserError):
    """The loss or gradient norm became non-finite; raised before the optimizer step (the weights are intact)."""

    def __init__(self, what: str, value: float, step: int) -> None:
        self.what, self.value, self.step = what, value, step
        super().__init__(f"training diverged: the {what} became {value:.4g} at step {step} (try a lower lr)")


def autocast_for(device: torch.device, precision: str = "auto") -> Callable[[], AbstractContextManager]:
    """A factory of the forward's autocast context: bf16 for "bf16", or "auto" on a CUDA device with bf16."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    return autocast


def compiled(model: nn.Module) -> nn.Module:
    """``torch.compile(model)`` (no fullgraph: SSA's hooks may break the graph). Keep the original module for
    state dicts: the compiled wrapper's keys carry an ``_orig_mod.`` prefix."""
    return cast(nn.Module, torch.compile(model))  # an OptimizedModule (typed as any callable)


# (B, T + 1) windows, (inputs, targets) each (B, T), or (inputs, targets, in-document positions) each (B, T)
Batch = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def inputs_targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch: the shifted halves of a (B, T + 1) window, or the given pair."""
    if isinstance(batch, torch.Tensor):
        return batch[:, :-1], batch[:, 1:]
    return batch[0], batch[1]


def batch_positions(batch: Batch) -> torch.Tensor | None:
    """The in-document positions (B, T) of a packed batch, None for any other."""
    return batch[2] if isinstance(batch, tuple) and len(batch) == 3 else None


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Callable[[int], Batch],
    *,
    step: int,
    lr_scale: float = 1.0,
    grad_accum: int = 1,
    clip: float | None = 1.0,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    no_sync: Callable[[int], AbstractContextManager] | None = None,
    reduce: Callable[[torch.Tensor], Any] | None = None,
    world: int = 1,
    params: Iterable[nn.Parameter] | None = None,
) -> tuple[float, float]:
    """One optimizer step at (0-indexed) ``step``: lr = base_lr * lr_scale, ``grad_accum`` micro-batches
    ``batch(m)`` (B, T + 1) (or an (inputs, targets) pair) on the model's device, mean loss, gradient clipping,
    AdamW step.

    ``no_sync(m)``: context of micro-batch m (DDP: skip the all-reduce but on the last); ``reduce``: in-place sum
    over processes of a (2,) tensor; ``world``: their number. Returns (train loss, gradient norm), averaged over
    processes; raises Diverged (before the update) when either is not finite. ``params``: what is clipped
    (default: the model's parameters)."""
    set_lr(optimizer, lr_scale)
    device = next(iter(optimizer.param_groups[0]["params"])).device
    loss_sum = torch.zeros((), device=device)
    for m in range(grad_accum):
        b = batch(m)
        x, y = inputs_targets(b)  # (B, T) each
        with no_sync(m) if no_sync is not None else nullcontext():
            with autocast():
                logits = L.logits_of(model(**model_inputs(x, batch_positions(b))))  # (B, T, V)
            loss = L.lm_loss(logits, y)
            (loss / grad_accum).backward()
        loss_sum += loss.detach().float()
    params = model.parameters() if params is None else params
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    stats = torch.stack([loss_sum / grad_accum, grad_norm.float().to(device)])
    if reduce is not None:
        reduce(stats)
    train_loss, norm = float(stats[0]) / world, float(stats[1]) / world
    if not math.isfinite(train_loss):
        raise Diverged("loss", train_loss, step + 1)
    if not math.isfinite(norm):
        raise Diverged("gradient norm", float(stats[1]), step + 1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return train_loss, norm


@dataclass
class FitResult:
    steps: int
    tokens: int
    train_loss: float  # the last step's
    losses: list[float] = field(default_factory=list)  # every step's train loss
    evals: list[tuple[int, Any]] = field(default_factory=list)  # (step, evaluate(model)) at eval_every and the end
    train_time_s: float = 0.0  # the steps only (evaluations excluded)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.train_time_s, 1e-9)


def fit(
    model: nn.Module,
    batches: Callable[[int], Batch],
    steps: int,
    optim: OptimConfig | None = None,
    *,
    device: str | torch.device | None = None,
    grad_accum: int = 1,
    precision: str = "fp32",
    temperature_params: Iterable[nn.Parameter] = (),
    schedule: Callable[[int], float] | None = None,
    evaluate: Callable[[nn.Module], Any] | None = None,
    eval_every: int = 0,
    compile: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train ``model`` for ``steps`` optimizer steps on ``batches`` with no run directory.

    - ``batches(i)``: micro-batch i = step * grad_accum + m, a (B, T + 1) long tensor or an (inputs, targets)
      pair (moved to the device here);
    - ``optim``: AdamW settings and the warmup/cosine schedule (``schedule(step) -> lr multiplier`` overrides it);
      ``temperature_params``: a method's own temperature parameters (``methods.Applied.temperature_parameters``);
      ``optimizer``: use this one instead of building it;
    - ``device``: "auto" / "cpu" / "cuda" / a torch.device; None: where the model already is;
    - ``evaluate(model)``: called every ``eval_every`` steps and after the last (model in eval mode, no grad);
    - ``compile``: torch.compile the forward; ``on_step(step, loss)``: after each step (1-indexed step).
    """
    optim = optim or OptimConfig()
    dev = (
        next(model.parameters()).device
        if device is None
        else (device if isinstance(device, torch.device) else choose_device(device))
    )
    model.to(dev).train()
    if optimizer is None:
        optimizer = build_optimizer(model, optim, dev, temperature_params)
    run_model = compiled(model) if compile else model
    autocast = autocast_for(dev, precision)
    scale = schedule or (lambda s: lr_factor(s, steps, optim.warmup, optim.min_lr_ratio))
    result = FitResult(steps=0, tokens=0, train_loss=math.nan)
    for step in range(steps):
        t0 = time.perf_counter()
        n_inputs: list[int] = []

        def batch(m: int, step: int = step, n_inputs: list[int] = n_inputs) -> Batch:
            w = batches(step * grad_accum + m)
            w = (
                w.to(dev, non_blocking=True)
                if isinstance(w, torch.Tensor)
                else cast(Batch, tuple(t.to(dev, non_blocking=True) for t in w))
            )
            n_inputs.append(inputs_targets(w)[0].numel())
            return w

        loss, _ = train_step(
            run_model,
            optimizer,
            batch,
            step=step,
            lr_scale=scale(step),
            grad_accum=grad_accum,
            clip=optim.clip,
            autocast=autocast,
            params=model.parameters(),
        )
        result.train_time_s += time.perf_counter() - t0
        result.steps, result.train_loss = step + 1, loss
        result.tokens += sum(n_inputs)
        result.losses.append(loss)
        if on_step is not None:
            on_step(step + 1, loss)
        if evaluate is not None and ((eval_every and (step + 1) % eval_every == 0) or step + 1 == steps):
            was = model.training
            model.eval()
            with torch.no_grad():
                result.evals.append((step + 1, evaluate(model)))
            model.train(was)
    return result
