"""``train(cfg)``: one process on a laptop CPU, or many under ``torchrun`` (DDP / FSDP), same code.

    data    : tokens.prepare(...) -> a memory-mapped train array, cut into seq_len windows (data.WindowSampler);
              --packing documents: attention and positions restart at every document of a window
    model   : models.build_model(size) or --init-from a pretrained model; the attention method (methods)
    optim   : optim.build_optimizer / lr_factor; each step is loop.train_step
    outputs : OUT/ssa-run.json (manifest), OUT/metrics.jsonl, OUT/checkpoints/, OUT/final/ (Hugging Face model +
              tokenizer), OUT/run.json; OUT is locked while a run uses it. rundir plans (fresh / resume / done),
              writer writes, metrics_log appends the metric lines, checkpoint holds the file format and RNG state

The run is ``setup(cfg, info, plan) -> TrainingRun``, ``run_steps(run)`` (steps, logging, validation,
checkpoints) and ``finish(run) -> run.json``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from selective_attention.config import SSAConfig
from selective_attention.data.tokens import prepare
from selective_attention.errors import UserError, first_line
from selective_attention.methods import Applied, apply_method, get_method, parameter_counts
from selective_attention.train import checkpoint as ckpt_io
from selective_attention.train import distributed, rundir, temperatures
from selective_attention.train.config import TrainConfig
from selective_attention.train.data import DocumentIndex, WindowSampler
from selective_attention.train.launch import launch
from selective_attention.train.limits import check_fits
from selective_attention.train.loop import Batch, Diverged, autocast_for, compiled, train_step
from selective_attention.train.loss import evaluate_loss, logits_of, model_inputs
from selective_attention.train.metrics_log import MetricsLog, read_metrics
from selective_attention.train.models import build_model, load_init
from selective_attention.train.optim import OptimConfig, build_optimizer, lr_factor
from selective_attention.train.writer import RunDir
from selective_attention.utils import parent as parent_process

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def train(cfg: TrainConfig) -> dict:
    """Train (or resume, or fine-tune) as ``cfg`` says; returns the content of OUT/run.json."""
    cfg.validate()
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(cfg)
    parent_process.follow_env()  # a process of `ssa train --nproc N`: it stops with the torchrun that started it
    plan = rundir.plan_out_dir(cfg, main=int(os.environ.get("RANK", "0")) == 0)
    try:
        if plan.kind == "done":
            assert plan.result is not None  # a finished run: its run.json, read while planning
            return plan.result
        if not cfg.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        info = distributed.init(cfg.device, cfg.fsdp)
        run: TrainingRun | None = None
        try:
            run = setup(cfg, info, plan)
            run_steps(run)
            return finish(run)
        except KeyboardInterrupt:
            if run is not None and run.bar is not None:
                run.bar.close()  # end the bar's line: the "interrupted" message then stands on its own
            raise
        finally:
            distributed.shutdown()
    except BaseException:
        plan.abandon()  # OUT again as it was when nothing was written
        raise
    finally:
        plan.release()


@dataclass
class TrainingRun:
    """The state of a run between setup and finish."""

    cfg: TrainConfig
    info: distributed.DistInfo
    out: Path
    tokenizer: Any
    sampler: WindowSampler
    val_tokens: np.ndarray
    model: PreTrainedModel  # the plain model (state dicts, saving)
    wrapped: nn.Module  # DDP / FSDP (or the model itself): gradients sync, clipping, checkpoints
    forward: nn.Module  # what the training steps call: wrapped, or torch.compile(wrapped)
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], AbstractContextManager]
    log: MetricsLog
    rundir: RunDir | None  # the main process's writer of OUT
    counts: dict[str, Any]
    ssa: SSAConfig | None
    total_steps: int
    warmup: int
    per_step: int  # sequences per optimizer step (all processes)
    run_config: dict[str, Any]
    step: int = 0
    elapsed_s: float = 0.0
    train_time_s: float = 0.0
    val_loss: float = math.nan
    val_step: int = -1  # the step val_loss belongs to
    bar: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    val_documents: DocumentIndex | None = None  # packing "documents": where the validation documents begin

    @property
    def tokens(self) -> int:
        return self.step * self.per_step * self.cfg.seq_len


def _build(cfg: TrainConfig, vocab: int, train_tokens: np.ndarray | None) -> tuple[PreTrainedModel, Applied]:
    """The model of the run with its attention method applied (same seed: same initial base weights)."""
    method = get_method(cfg.attention)
    ssa = cfg.ssa_config() if method.uses_ssa else None

    def apply(model: PreTrainedModel) -> Applied:
        return apply_method(
            model,
            cfg.attention,
            ssa=ssa,
            seq_len=cfg.seq_len,
            options=cfg.method_options,
            train_tokens=train_tokens,
            vocab=vocab,
        )

    # models.load_init / build_model give Hugging Face models (typed nn.Module there)
    if cfg.init_from:
        torch.manual_seed(cfg.seed)
        model = cast("PreTrainedModel", load_init(cfg.init_from))
        saved_method = getattr(model.config, "ssa_method", None)
        if saved_method:
            raise UserError(
                f"--init-from {cfg.init_from} was trained with method "
                f"{saved_method['name']}: only vanilla and SSA models can be fine-tuned"
            )
        saved = getattr(model.config, "ssa", None)
        if not method.uses_ssa and saved:
            raise UserError(f"--init-from {cfg.init_from} is an SSA model: fine-tune it with --attention ssa")
        # the model keeps its own temperatures: other SSA settings would be a lie (its start, init and
        # position_init, and c's step size, position_scale, belong to the saved model)
        if saved and cfg.ssa is not None and ssa is not None:
            ours = {
                k: v
                for k, v in ssa.to_dict().items()
                if k not in ("init", "mlp_hidden", "position_init", "position_scale")
            }
            diff = sorted(k for k, v in ours.items() if saved.get(k, v) != v)
            if diff:
                raise UserError(
                    f"--init-from {cfg.init_from} is an SSA model with other settings ({', '.join(diff)}):"
                    " drop the SSA flags to fine-tune it as it is"
                )
        return model, apply(model)
    model = cast("PreTrainedModel", build_model(cfg.size, vocab, cfg.seq_len, "vanilla", None, cfg.seed))
    return model, apply(model)


def _to_device(model: nn.Module, device: torch.device | str) -> None:
    """``model.to(device)`` (typed as nn.Module's: transformers declares its override through functools.wraps,
    which type checkers read as an unbound function)."""
    model.to(device)


def _embedded_ids(model: PreTrainedModel) -> int:
    """How many token ids ``model`` embeds: the rows of its input embedding."""
    embedding: Any = model.get_input_embeddings()  # an nn.Embedding (nn.Module types its fields Tensor | Module)
    return embedding.num_embeddings


def _freeze_all_but_temperatures(model: nn.Module, applied: Applied, attention: str) -> None:
    """--temperatures-only: only the temperature parameters train (SSA's and a method's own)."""
    from selective_attention.temperature import temperature_parameters

    keep = {id(p) for p in temperature_parameters(model)} | {id(p) for p in applied.temperature_parameters}
    if not keep:
        raise UserError(f"--temperatures-only: --attention {attention} has no temperature parameters to train")
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def setup(cfg: TrainConfig, info: distributed.DistInfo, plan: rundir.Plan) -> TrainingRun:
    """Data, model, optimizer (restored from the plan's checkpoint when resuming) and the run directory."""
    out = plan.out
    # ---- data (rank 0 tokenises into the cache, the others then read it)
    data = distributed.main_first(
        lambda: prepare(
            cfg.data,
            cfg.tokenizer_kind,
            cfg.vocab_size,
            cfg.init_from,
            cfg.split_seed,
            cfg.cache_dir,
            splits=("train", "val"),
        ),
        info,
    )
    tokenizer = data.tokenizer
    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    packed = cfg.packing == "documents"
    sampler = WindowSampler(train_tokens, cfg.seq_len, cfg.seed, boundary=data.eot_id if packed else None)
    val_documents = DocumentIndex(val_tokens, data.eot_id) if packed else None

    # ---- model
    method = get_method(cfg.attention)
    model, applied = _build(cfg, len(tokenizer), train_tokens if method.needs_train_tokens else None)
    # the temperatures the model really has (an SSA checkpoint fine-tuned further keeps its own)
    saved_ssa = getattr(model.config, "ssa", None)
    ssa = (
        SSAConfig.from_dict(saved_ssa)
        if saved_ssa and method.uses_ssa
        else (cfg.ssa_config() if method.uses_ssa else None)
    )
    if cfg.init_from and _embedded_ids(model) < len(tokenizer):
        raise UserError(f"--init-from {cfg.init_from}: its tokenizer has more tokens than the model embeds")
    if packed:
        assert sampler.documents is not None and val_documents is not None  # both indexed when packed
        check_documents_apart(model, cfg.attention)
        table = getattr(model.config, "n_positions", None)  # learned absolute positions (GPT-2): a hard limit
        longest = max(sampler.documents.longest(), val_documents.longest())
        if isinstance(table, int) and longest > table:
            raise UserError(
                f"--packing documents: the longest document has {longest:,} tokens, but the model "
                f"embeds positions up to {table:,} only: use --packing stitched"
            )
    counts = parameter_counts(model, applied)
    temperature_start = temperatures.snapshot(model)  # before a checkpoint: the run's own start (same seed)
    if cfg.temperatures_only:
        _freeze_all_but_temperatures(model, applied, cfg.attention)
    _to_device(model, info.device)

    world, B, A, T = info.world_size, cfg.batch_size, cfg.grad_accum, cfg.seq_len
    per_step = B * A * world  # sequences per optimizer step
    total_steps, warmup = cfg.total_steps(world), cfg.warmup_steps(world)
    if warmup > total_steps:
        raise UserError(f"--warmup {warmup} is longer than the run ({total_steps} optimizer steps)")
    check_fits(model, info.device, B, T, per_step * (T + 1), len(train_tokens))

    ckpt, plan.state = plan.state, None
    if ckpt is not None and ckpt.get("tokens") not in (None, ckpt["step"] * per_step * T):
        # the data order and the schedule are functions of the global batch: another one would silently redo or
        # skip samples (e.g. --nproc 2 resumed with --nproc 1)
        then = ckpt["tokens"] // max(1, ckpt["step"] * T)
        raise UserError(
            f"{plan.checkpoint}: written with {then} sequences per optimizer step, these settings give "
            f"{per_step} (--batch-size x --grad-accum x processes): resume with the same global batch"
        )
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise UserError(f"{plan.checkpoint}: does not fit the model of these settings ({first_line(e)})") from None
    temp_ids = {id(p) for p in applied.temperature_parameters}
    temp_names = {n for n, p in model.named_parameters() if id(p) in temp_ids}
    wrapped = distributed.wrap(model, info)
    opt_model = wrapped if info.fsdp else model
    # FSDP replaces the parameters by sharded ones: the method's temperature parameters, found again by name
    temperature_params = (
        [p for n, p in opt_model.named_parameters() if n in temp_names] if info.fsdp else applied.temperature_parameters
    )
    optim = OptimConfig(
        lr=cfg.lr,
        temperature_lr=cfg.effective_temperature_lr(),
        weight_decay=cfg.weight_decay,
        warmup=warmup,
        min_lr_ratio=cfg.min_lr_ratio,
        clip=cfg.clip,
    )
    optimizer = build_optimizer(opt_model, optim, info.device, temperature_params)
    step, elapsed_s, train_time_s, val_loss, val_step = 0, 0.0, 0.0, math.nan, -1
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        distributed.load_optimizer_state(wrapped, optimizer, ckpt["optimizer"], info)
        step, elapsed_s, train_time_s = ckpt["step"], ckpt["elapsed_s"], ckpt["train_time_s"]
        ckpt_io.set_rng_state(ckpt["rng"])
        if ckpt.get("val_step") == step:
            val_loss, val_step = ckpt["val_loss"], step
        else:  # an older checkpoint: the validation logged at its step, if any
            logged = [m["val_loss"] for m in read_metrics(metrics_path) if m["step"] == step and "val_loss" in m]
            if logged:
                val_loss, val_step = logged[-1], step
        del ckpt

    # ---- run directory (only now: every input was valid)
    rd = RunDir.begin(plan, cfg, step) if info.is_main else None
    distributed.barrier(info)
    run_config = {
        **cfg.resolved().to_dict(),
        "world_size": world,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "tokens_per_step": per_step * T,
        "tokenizer_kind": cfg.tokenizer_kind,
        "vocab": len(tokenizer),
        "ssa": ssa.to_dict() if ssa else None,
        "data_manifest": data.manifests["train"],
    }
    if cfg.attention != "vanilla" and not method.uses_ssa:
        run_config["method"] = model.config.ssa_method
    return TrainingRun(
        cfg=cfg,
        info=info,
        out=out,
        tokenizer=tokenizer,
        sampler=sampler,
        val_tokens=val_tokens,
        model=model,
        wrapped=wrapped,
        forward=compiled(wrapped) if cfg.compile else wrapped,
        optimizer=optimizer,
        autocast=autocast_for(info.device, cfg.precision),
        log=MetricsLog(metrics_path, info.is_main),
        rundir=rd,
        counts=counts,
        ssa=ssa,
        total_steps=total_steps,
        warmup=warmup,
        per_step=per_step,
        run_config=run_config,
        step=step,
        elapsed_s=elapsed_s,
        train_time_s=train_time_s,
        val_loss=val_loss,
        val_step=val_step,
        extra={"temperature_start": temperature_start},
        val_documents=val_documents,
    )


@torch.no_grad()
def check_documents_apart(model: PreTrainedModel, attention: str) -> None:
    """--packing documents: refuse a model in which two packed documents (position_ids restarting) do not get the
    logits each gets alone - a family or transformers version whose masks ignore packed position_ids would
    silently train across documents. Three forwards of a few tokens on the freshly built model."""
    vocab = _embedded_ids(model)
    a, b = torch.arange(1, 6) % vocab, torch.arange(7, 10) % vocab
    was_training = model.training
    model.eval()
    try:
        alone = torch.cat([logits_of(model(input_ids=t[None])) for t in (a, b)], dim=1)  # (1, 8, V)
        pos = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]  # (1, 8): restarts at b
        packed = logits_of(model(**model_inputs(torch.cat([a, b])[None], pos)))
    except UserError as e:
        raise UserError(
            f"--packing documents: --attention {attention} cannot keep packed documents apart ({first_line(e)})"
        ) from None
    finally:
        model.train(was_training)
    if not torch.allclose(packed.float(), alone.float(), atol=1e-4, rtol=1e-4):
        raise UserError(
            f"--packing documents: {type(model).__name__} (attention {attention}) lets packed documents "
            "see each other with this transformers version: use --packing stitched"
        )


def save_checkpoint(run: TrainingRun) -> Path | None:
    model_sd, opt_sd = distributed.full_state(run.wrapped, run.optimizer, run.info)
    if run.rundir is None:
        return None
    return run.rundir.save_checkpoint(
        {
            "step": run.step,
            "tokens": run.tokens,
            "elapsed_s": run.elapsed_s,
            "train_time_s": run.train_time_s,
            "val_loss": run.val_loss,
            "val_step": run.val_step,
            "model": model_sd,
            "optimizer": opt_sd,
            "config": run.cfg.resolved().to_dict(),
        },
        run.cfg.keep_checkpoints,
    )


def validate(run: TrainingRun) -> float:
    cfg = run.cfg
    loss = evaluate_loss(
        run.wrapped if run.info.fsdp else run.model,
        run.val_tokens,
        cfg.seq_len,
        cfg.batch_size,
        cfg.eval_tokens,
        run.info,
        run.autocast,
        documents=run.val_documents,
    )
    run.log.write({"step": run.step, "tokens": run.tokens, "val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))})
    run.val_step = run.step
    return loss


def _micro_batch(run: TrainingRun, step: int) -> Callable[[int], Batch]:
    info, B = run.info, run.cfg.batch_size

    def batch(m: int) -> Batch:
        first = step * run.per_step + m * B * info.world_size + info.rank * B  # global sample index
        b = run.sampler.samples(range(first, first + B))  # windows, or (inputs, targets, positions) when packed
        if isinstance(b, torch.Tensor):
            return b.to(info.device, non_blocking=True)
        inputs, targets, positions = b
        return (
            inputs.to(info.device, non_blocking=True),
            targets.to(info.device, non_blocking=True),
            positions.to(info.device, non_blocking=True),
        )

    return batch


def run_steps(run: TrainingRun) -> None:
    """Optimizer steps up to the end (or stop_at_step), with logging, validation and checkpoints."""
    cfg, info = run.cfg, run.info
    eval_every = cfg.eval_every or run.total_steps
    ckpt_every = cfg.checkpoint_every or eval_every
    if run.step and info.is_main:  # a resumed run says so, before its bar starts at that step
        print(f"{run.out}: resuming from step {run.step} of {run.total_steps}", file=sys.stderr, flush=True)
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        run.bar = tqdm(
            total=run.total_steps,
            initial=run.step,
            unit="step",
            dynamic_ncols=True,
            desc=f"{cfg.attention} {cfg.size if not cfg.init_from else Path(cfg.init_from).name}",
        )
    bar = run.bar
    run.wrapped.train()
    window_time, window_tokens = 0.0, 0  # training time and tokens since the last log line
    run_start = time.perf_counter() - run.elapsed_s
    # --stop-at-step stops a run that reaches it; a run resumed at or past it (the same command run again)
    # continues to the end
    stop = (
        run.total_steps
        if cfg.stop_at_step is None or run.step >= cfg.stop_at_step
        else min(run.total_steps, cfg.stop_at_step)
    )
    A = cfg.grad_accum
    while run.step < stop:
        if parent_process.gone():  # started by a study or torchrun that has died: stop, resumable from a checkpoint
            if bar is not None:
                bar.close()
            raise parent_process.ParentGone()
        t0 = time.perf_counter()
        factor = lr_factor(run.step, run.total_steps, run.warmup, cfg.min_lr_ratio)
        try:
            train_loss, _ = train_step(
                run.forward,
                run.optimizer,
                _micro_batch(run, run.step),
                step=run.step,
                lr_scale=factor,
                grad_accum=A,
                clip=cfg.clip,
                autocast=run.autocast,
                no_sync=lambda m: distributed.no_sync(run.wrapped, info, sync=m == A - 1),
                reduce=lambda t: distributed.all_reduce_sum(t, info),
                world=info.world_size,
                params=run.wrapped.parameters(),
            )
        except Diverged as e:
            latest = RunDir(run.out).newest_checkpoint()
            where = f"the last good checkpoint is kept: {latest}" if latest else "no checkpoint was written yet"
            if bar is not None:
                bar.close()
            raise UserError(
                f"training diverged: the {e.what} became {e.value:.4g} at step {e.step}; {where} (try a lower --lr)"
            ) from None
        run.step += 1
        dt = time.perf_counter() - t0
        run.train_time_s += dt
        window_tokens += run.per_step * cfg.seq_len
        window_time += dt
        run.elapsed_s = time.perf_counter() - run_start
        if run.step % cfg.log_every == 0 or run.step == 1 or run.step == run.total_steps:
            tps = window_tokens / max(window_time, 1e-9)
            run.log.write(
                {
                    "step": run.step,
                    "tokens": run.tokens,
                    "lr": cfg.lr * factor,
                    "train_loss": train_loss,
                    "tokens_per_s": tps,
                    "elapsed_s": run.elapsed_s,
                }
            )
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            window_time, window_tokens = 0.0, 0
        if bar is not None:
            bar.update(1)
        if run.step % eval_every == 0 or run.step == run.total_steps:
            run.val_loss = validate(run)
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{run.val_loss:.3f}", refresh=False)
        if run.step % ckpt_every == 0 or run.step == stop:
            save_checkpoint(run)
    if bar is not None:
        bar.close()


def _temperature_record(run: TrainingRun, model: nn.Module) -> dict[str, Any]:
    """Where the temperatures ended and how far they could move (``train.temperatures``), with the token term's
    spread over the first validation windows."""
    cfg = run.cfg
    rec = temperatures.summary(
        model,
        run.extra.get("temperature_start", {}),
        temperature_lr=cfg.effective_temperature_lr(),
        total_steps=run.total_steps,
        warmup=run.warmup,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    n = min(cfg.batch_size, max(1, (len(run.val_tokens) - 1) // cfg.seq_len))
    ids = torch.tensor(np.asarray(run.val_tokens[: n * cfg.seq_len]), dtype=torch.long).view(n, cfg.seq_len)
    was_training = model.training
    model.eval()
    rec["token_spread"] = temperatures.token_spread(model, ids)
    model.train(was_training)
    return rec


def finish(run: TrainingRun) -> dict:
    """Save the final model (Hugging Face format) and run.json; a run stopped early (stop_at_step) only reports."""
    cfg, info = run.cfg, run.info
    if run.step < run.total_steps:  # stopped early on purpose (stop_at_step): resumable
        distributed.barrier(info)
        return {"stopped_at_step": run.step, "total_steps": run.total_steps}
    if run.val_step != run.step:  # resumed from the final checkpoint of an older version: validate again
        run.val_loss = validate(run)
    if not math.isfinite(run.val_loss):
        where = run.rundir.newest_checkpoint() if run.rundir else None
        raise UserError(
            f"the final validation loss is {run.val_loss} (the model's predictions are not finite); "
            f"no result is written" + (f"; the last checkpoint is kept: {where}" if where else "")
        )
    model_sd, _ = distributed.full_state(run.wrapped, run.optimizer, info) if info.fsdp else (None, None)
    result = {
        "attention": cfg.attention,
        "size": cfg.size if not cfg.init_from else Path(cfg.init_from).name,
        "seed": cfg.seed,
        "config": run.run_config,
        "parameters": run.counts,
        "tokens_per_s": run.tokens / max(run.train_time_s, 1e-9),
        "final_val_loss": run.val_loss,
        "final_val_ppl": math.exp(min(run.val_loss, 700.0)),
        "tokens": run.tokens,
        "steps": run.step,
        "train_time_s": run.train_time_s,
        "elapsed_s": run.elapsed_s,
    }
    if run.rundir is not None:
        final = run.model
        if model_sd is not None:  # FSDP: rebuild an unsharded copy on rank 0
            final, _ = _build(
                cfg,
                len(run.tokenizer),
                np.asarray(run.sampler.tokens) if get_method(cfg.attention).needs_train_tokens else None,
            )
            final.load_state_dict(model_sd)
        _to_device(final, "cpu")
        result["temperatures"] = _temperature_record(run, final)
        run.rundir.save_final(final, run.tokenizer)
        _to_device(final, info.device)
        run.rundir.save_result(result)
    distributed.barrier(info)
    return result
