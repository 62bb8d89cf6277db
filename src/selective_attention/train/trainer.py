"""The training loop: one process on a laptop CPU, or many under ``torchrun`` (DDP / FSDP), same code.

    data    : tokens.prepare(...) -> a memory-mapped train array, cut into seq_len windows; the order of the
              windows is a pure function of (seed, global sample index), so a resumed run and a run on N
              processes with the same global batch see exactly the same data
    model   : models.build_model(size, ...) or --init-from a pretrained model; SSA via hf.convert
    optim   : AdamW, temperature parameters in their own group (temperature.param_groups), linear warmup then
              cosine decay to min_lr_ratio * lr, gradient clipping, one optimizer step per accumulated batch
    outputs : OUT/metrics.jsonl, OUT/checkpoints/step-XXXXXXXX.pt (+ OUT/checkpoints/latest), OUT/final/
              (Hugging Face model + tokenizer), OUT/run.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from selective_attention.config import SSAConfig
from selective_attention.data.tokens import prepare
from selective_attention.errors import UserError
from selective_attention.temperature import param_groups
from selective_attention.train import distributed as D
from selective_attention.train.models import SIZES, build_model, parameter_counts, with_attention
from selective_attention.utils.io import atomic_torch_save, atomic_write_json, atomic_write_text

CHECKPOINT_FORMAT = 1
FINETUNE_TEMPERATURE_LR = 1e-2  # the official SSA fine-tuning recipe (weights at 1e-5)
# Fields that may differ between an interrupted run and its resumption (they do not change the result).
RESUME_FREE = {"progress", "overwrite", "stop_at_step", "cache_dir", "keep_checkpoints", "nproc", "log_every"}


@dataclass
class TrainConfig:
    """Everything a training run depends on; the ``ssa train`` options and YAML config keys mirror these."""

    data: str = "wiki"
    attention: str = "vanilla"  # vanilla | ssa
    size: str = "tiny"  # tiny | small | gpt2-124m | pythia-160m (ignored with init_from)
    max_tokens: int = 1_000_000  # training tokens (rounded up to whole optimizer steps)
    seed: int = 0
    out: str = "runs/train"
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    temperature_lr: float | None = None  # None: lr from scratch; FINETUNE_TEMPERATURE_LR with init_from
    min_lr_ratio: float = 0.1
    warmup: int | None = None  # optimizer steps; None: 5% of the steps
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 100  # optimizer steps between validations (0: only at the end)
    eval_tokens: int = 65536  # validation tokens per evaluation (from the start of the val split)
    checkpoint_every: int | None = None  # optimizer steps between checkpoints; None: eval_every
    keep_checkpoints: int = 2
    log_every: int = 10
    init_from: str | None = None  # a Hugging Face model folder or a .gguf file
    # SSA switches (selective_attention.config.SSAConfig)
    sharing: str = "shared"
    query: bool = True
    value: bool = True
    key: bool = False
    token_aware: bool = True
    position_aware: bool = True
    value_position_aware: bool = False
    ssa_init: str | None = None  # identity | scratch; None: scratch from scratch, identity with init_from
    mlp_hidden: int | None = None
    # data
    tokenizer: str | None = None  # bpe | gpt2 | pretrained; None: bpe from scratch, pretrained with init_from
    vocab_size: int = 8192
    split_seed: int = 0  # the corpus split (kept apart from seed so that every run shares one split)
    cache_dir: str | None = None
    # machinery
    precision: str = "auto"  # auto (bf16 autocast on CUDA, else fp32) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    nproc: int = 1  # > 1: relaunch under torchrun with this many processes
    fsdp: bool = False
    progress: bool = True
    overwrite: bool = False
    stop_at_step: int | None = None  # checkpoint and stop after this step, as if interrupted; rerun to resume

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def effective_temperature_lr(self) -> float:
        """From scratch the temperatures train at the base rate (10x lost 5 % val ppl in the ablation harness);
        a fine-tune follows the official recipe's 1e-2, since at a fine-tuning lr (~1e-5) they would not move."""
        if self.temperature_lr is not None:
            return self.temperature_lr
        return FINETUNE_TEMPERATURE_LR if self.init_from else self.lr

    def ssa_config(self) -> SSAConfig:
        init = self.ssa_init or ("identity" if self.init_from else "scratch")
        try:
            return SSAConfig(query=self.query, value=self.value, key=self.key, token_aware=self.token_aware,
                             position_aware=self.position_aware,
                             value_position_aware=self.value_position_aware, sharing=self.sharing, init=init,
                             mlp_hidden=self.mlp_hidden, temperature_lr=self.temperature_lr)
        except ValueError as e:
            raise UserError(str(e)) from None

    def validate(self) -> None:
        """Raise UserError for an invalid value (before anything is read or written)."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(self.attention in ("vanilla", "ssa"), f"--attention must be vanilla or ssa, got {self.attention!r}")
        need(self.init_from is not None or self.size in SIZES,
             f"unknown --size {self.size!r}: use one of {', '.join(SIZES)}")
        for name in ("max_tokens", "seq_len", "batch_size", "grad_accum", "nproc", "vocab_size", "log_every",
                     "keep_checkpoints", "eval_tokens"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                 f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("lr", "clip"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"--{name} must be > 0, got {v!r}")
        need(self.temperature_lr is None or (math.isfinite(self.temperature_lr) and self.temperature_lr >= 0),
             f"--temperature-lr must be >= 0, got {self.temperature_lr!r}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.warmup is None or self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        need(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1, "--checkpoint-every must be >= 1")
        need(self.stop_at_step is None or self.stop_at_step >= 1, "--stop-at-step must be >= 1")
        need(self.precision in ("auto", "fp32", "bf16"), f"--precision must be auto, fp32 or bf16, got "
             f"{self.precision!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        tok = self.tokenizer_kind
        need(tok in ("bpe", "gpt2", "pretrained"), f"--tokenizer must be bpe, gpt2 or pretrained, got {tok!r}")
        need(tok != "pretrained" or self.init_from is not None, "--tokenizer pretrained needs --init-from")
        need(self.init_from is None or tok == "pretrained",
             "--init-from fine-tunes a pretrained model with its own tokenizer: drop --tokenizer")
        need(self.ssa_init in (None, "identity", "scratch"), f"--ssa-init must be identity or scratch, got "
             f"{self.ssa_init!r}")
        if self.attention == "ssa":
            self.ssa_config()
        if self.init_from is not None and not Path(self.init_from).expanduser().exists():
            raise UserError(f"--init-from: not found: {self.init_from}")

    @property
    def tokenizer_kind(self) -> str:
        return self.tokenizer or ("pretrained" if self.init_from else "bpe")


# ----------------------------------------------------------------------------------------------------------
# data order


class WindowSampler:
    """Non-overlapping seq_len+1 token windows of the train array, reshuffled (order and phase) every epoch.

    ``windows(indices)`` returns the windows of global sample indices; sample g lives in epoch g // n_windows.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        n = len(tokens)
        if n < seq_len + 1:
            raise UserError(f"the train split has {n} tokens, fewer than --seq-len + 1 = {seq_len + 1}: "
                            "use a larger corpus or a smaller --seq-len")
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.max_phase = seq_len if n >= 2 * seq_len else 1  # a random phase only if it keeps >= 1 window
        self.n_windows = (n - self.max_phase) // seq_len
        self._epoch, self._perm, self._phase = -1, None, 0

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n_windows, generator=g).numpy()
            self._phase = int(torch.randint(self.max_phase, (1,), generator=g))
            self._epoch = epoch

    def windows(self, indices: range) -> torch.Tensor:
        rows = []
        for g in indices:
            self._set_epoch(g // self.n_windows)
            start = self._phase + int(self._perm[g % self.n_windows]) * self.seq_len
            rows.append(np.asarray(self.tokens[start: start + self.seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))  # (n, seq_len + 1)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of every group's base learning rate at optimizer step ``step`` (0-indexed)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------
# run directory


def _latest_checkpoint(out: Path) -> Path | None:
    latest = out / "checkpoints" / "latest"
    if latest.is_file():
        p = out / "checkpoints" / latest.read_text().strip()
        if p.is_file():
            return p
    return None


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in RESUME_FREE}


def _plan_out_dir(cfg: TrainConfig) -> tuple[str, Path | None]:
    """"fresh", "resume" (with its checkpoint) or "done"; UserError when OUT holds something else."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {cfg.out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return "fresh", None
    if cfg.overwrite:
        return "fresh", None
    run_json = out / "run.json"
    ckpt = _latest_checkpoint(out)
    if ckpt is None and not run_json.is_file():
        raise UserError(f"--out {cfg.out} is not empty and holds no run of ours: choose another directory "
                        "(or --overwrite)")
    saved = json.loads(run_json.read_text())["config"] if run_json.is_file() else \
        torch.load(ckpt, map_location="cpu", weights_only=False)["config"]
    current = _comparable(cfg.to_dict())
    diff = sorted(k for k in current if saved.get(k) != current[k])
    if diff:
        raise UserError(f"--out {cfg.out} holds a run with other settings ({', '.join(diff)}): choose another "
                        "directory or pass --overwrite")
    return ("done", None) if run_json.is_file() else ("resume", ckpt)


def _clear_out_dir(out: Path) -> None:
    """Remove what an earlier run of ours wrote (only our own files, never anything else)."""
    for name in ("checkpoints", "final"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("metrics.jsonl", "run.json"):
        if (out / name).exists():
            (out / name).unlink()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------------------------------------
# model loading


def _load_init(path: str):
    """(model, tokenizer) from a Hugging Face folder or a .gguf file; UserError when it cannot be loaded."""
    try:
        from selective_attention import hf

        loader = hf.load_pretrained
    except (ImportError, AttributeError):
        loader = None
    try:
        if loader is not None:
            model, _ = loader(path)
        else:
            from transformers import AutoModelForCausalLM

            p = Path(path).expanduser()
            kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
            model = AutoModelForCausalLM.from_pretrained(str(p.parent if kw else p), dtype=torch.float32,
                                                         local_files_only=True, **kw)
    except UserError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"--init-from {path}: cannot load the model ({type(e).__name__}: {msg})") from None
    for p in model.parameters():  # float32 master weights (a de-quantised GGUF model refuses .float())
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return model


# ----------------------------------------------------------------------------------------------------------
# the loop


class _Logger:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int,
                  info: D.DistInfo, autocast) -> float:
    """Mean next-token loss over the first ``max_tokens`` tokens of ``tokens`` in non-overlapping windows."""
    L = min(seq_len, len(tokens) - 1)
    n_win = max(1, min(max_tokens // L, (len(tokens) - 1) // L))
    mine = list(range(info.rank, n_win, info.world_size))
    total = torch.zeros(2, dtype=torch.float64, device=info.device)  # (sum of losses, tokens)
    was_training = model.training
    model.eval()
    # FSDP: every rank must run the same number of forwards (they are collectives)
    per_rank = math.ceil(n_win / info.world_size)
    n_batches = math.ceil(per_rank / batch_size)
    for b in range(n_batches):
        idx = mine[b * batch_size: (b + 1) * batch_size]
        pad = not idx
        idx = idx or [0]
        w = torch.from_numpy(np.stack([np.asarray(tokens[i * L: i * L + L + 1], dtype=np.int64) for i in idx]))
        w = w.to(info.device)
        with autocast():
            logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        if not pad:
            total[0] += loss.double()
            total[1] += w[:, 1:].numel()
    D.all_reduce_sum(total, info)
    model.train(was_training)
    return float(total[0] / total[1])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: TrainConfig) -> dict:
    """Train (or resume, or fine-tune) as ``cfg`` says; returns the content of OUT/run.json."""
    cfg.validate()
    if cfg.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(cfg)
    plan, ckpt_path = _plan_out_dir(cfg)
    out = Path(cfg.out).expanduser()
    if plan == "done":
        return json.loads((out / "run.json").read_text())

    if not cfg.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    info = D.init(cfg.device, cfg.fsdp)
    try:
        return _train(cfg, info, out, ckpt_path)
    finally:
        D.shutdown()


def _launch(cfg: TrainConfig) -> dict:
    _plan_out_dir(cfg)  # a bad --out, corpus or vocabulary fails here, in one line, before spawning anything
    prepare(cfg.data, cfg.tokenizer_kind, cfg.vocab_size, cfg.init_from, cfg.split_seed, cfg.cache_dir,
            splits=("train", "val"))  # also fills the token cache once for all processes
    import yaml

    with tempfile.TemporaryDirectory(prefix="ssa-train-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump({**cfg.to_dict(), "nproc": cfg.nproc}))
        code = D.launch(cfg.nproc, str(path))
    if code != 0:
        raise UserError(f"torchrun with {cfg.nproc} processes failed (exit code {code}); see the messages above")
    return json.loads((Path(cfg.out).expanduser() / "run.json").read_text())


def _train(cfg: TrainConfig, info: D.DistInfo, out: Path, ckpt_path: Path | None) -> dict:
    # ---- data (rank 0 tokenises into the cache, the others then read it)
    data = D.main_first(lambda: prepare(cfg.data, cfg.tokenizer_kind, cfg.vocab_size, cfg.init_from,
                                        cfg.split_seed, cfg.cache_dir, splits=("train", "val")), info)
    tokenizer = data.tokenizer
    train_tokens, val_tokens = data.tokens("train"), data.tokens("val")
    sampler = WindowSampler(train_tokens, cfg.seq_len, cfg.seed)

    # ---- model
    ssa = cfg.ssa_config() if cfg.attention == "ssa" else None
    if cfg.init_from:
        torch.manual_seed(cfg.seed)
        model = _load_init(cfg.init_from)
        if cfg.attention == "vanilla" and getattr(model.config, "ssa", None):
            raise UserError(f"--init-from {cfg.init_from} is an SSA model: fine-tune it with --attention ssa")
        model = with_attention(model, cfg.attention, ssa)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise UserError(f"--init-from {cfg.init_from}: its tokenizer has more tokens than the model embeds")
    else:
        model = build_model(cfg.size, len(tokenizer), cfg.seq_len, cfg.attention, ssa, cfg.seed)
    counts = parameter_counts(model)
    model.to(info.device)

    world, B, A, T = info.world_size, cfg.batch_size, cfg.grad_accum, cfg.seq_len
    per_step = B * A * world  # sequences per optimizer step
    total_steps = max(1, math.ceil(cfg.max_tokens / (per_step * T)))
    warmup = cfg.warmup if cfg.warmup is not None else max(1, total_steps // 20)
    eval_every = cfg.eval_every or total_steps
    ckpt_every = cfg.checkpoint_every or eval_every

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False) if ckpt_path else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    wrapped = D.wrap(model, info)
    opt_model = wrapped if info.fsdp else model
    groups = param_groups(opt_model, cfg.lr, cfg.effective_temperature_lr(), cfg.weight_decay)
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, fused=info.device.type == "cuda")
    step, elapsed_s, train_time_s = 0, 0.0, 0.0
    if ckpt is not None:
        D.load_optimizer_state(wrapped, optimizer, ckpt["optimizer"], info)
        step, elapsed_s, train_time_s = ckpt["step"], ckpt["elapsed_s"], ckpt["train_time_s"]
        _set_rng_state(ckpt["rng"])
        del ckpt

    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and info.device.type == "cuda"
                                           and torch.cuda.is_bf16_supported())

    def autocast():
        return torch.autocast(info.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # ---- run directory (only now: every input was valid)
    metrics_path = out / "metrics.jsonl"
    if info.is_main:
        if ckpt_path is None:
            out.mkdir(parents=True, exist_ok=True)
            _clear_out_dir(out)
        else:
            _truncate_metrics(metrics_path, step)
    D.barrier(info)
    log = _Logger(metrics_path, info.is_main)
    run_config = {**cfg.to_dict(), "world_size": world, "total_steps": total_steps, "warmup_steps": warmup,
                  "tokens_per_step": per_step * T, "tokenizer_kind": cfg.tokenizer_kind,
                  "vocab": len(tokenizer), "ssa": ssa.to_dict() if ssa else None, "data_manifest":
                  data.manifests["train"]}

    def save_checkpoint() -> Path | None:
        model_sd, opt_sd = D.full_state(wrapped, optimizer, info)
        if not info.is_main:
            return None
        name = f"step-{step:08d}.pt"
        path = atomic_torch_save({"format": CHECKPOINT_FORMAT, "step": step, "tokens": step * per_step * T,
                                  "elapsed_s": elapsed_s, "train_time_s": train_time_s, "model": model_sd,
                                  "optimizer": opt_sd, "rng": _rng_state(), "config": cfg.to_dict()},
                                 out / "checkpoints" / name)
        atomic_write_text(out / "checkpoints" / "latest", name + "\n")
        for old in sorted((out / "checkpoints").glob("step-*.pt"))[: -cfg.keep_checkpoints]:
            old.unlink()
        return path

    def validate() -> float:
        loss = evaluate_loss(wrapped if info.fsdp else model, val_tokens, T, B, cfg.eval_tokens, info, autocast)
        log.write({"step": step, "tokens": step * per_step * T, "val_loss": loss,
                   "val_ppl": math.exp(min(loss, 700.0))})
        return loss

    bar = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
                   desc=f"{cfg.attention} {cfg.size if not cfg.init_from else Path(cfg.init_from).name}")

    # ---- loop
    wrapped.train()
    val_loss = float("nan")
    window_time, window_tokens = 0.0, 0  # training time and tokens since the last log line
    run_start = time.perf_counter() - elapsed_s
    stop = min(total_steps, cfg.stop_at_step or total_steps)
    while step < stop:
        t0 = time.perf_counter()
        factor = lr_factor(step, total_steps, warmup, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        loss_sum = torch.zeros((), device=info.device)
        for m in range(A):
            first = step * per_step + m * B * world + info.rank * B  # this micro-batch's global sample index
            w = sampler.windows(range(first, first + B)).to(info.device, non_blocking=True)
            with D.no_sync(wrapped, info, sync=m == A - 1):
                with autocast():
                    logits = wrapped(input_ids=w[:, :-1]).logits
                loss = lm_loss(logits, w[:, 1:])
                (loss / A).backward()
            loss_sum += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        stats = torch.stack([loss_sum / A, grad_norm.float().to(info.device)])
        D.all_reduce_sum(stats, info)
        train_loss = float(stats[0]) / world
        if not (math.isfinite(train_loss) and math.isfinite(float(stats[1]))):
            latest = _latest_checkpoint(out)
            where = f"the last good checkpoint is kept: {latest}" if latest else "no checkpoint was written yet"
            if bar is not None:
                bar.close()
            what = "loss" if not math.isfinite(train_loss) else "gradient norm"
            raise UserError(f"training diverged: the {what} became {train_loss if what == 'loss' else stats[1]:.4g}"
                            f" at step {step + 1}; {where} (try a lower --lr)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        train_time_s += dt
        window_tokens += per_step * T
        window_time += dt
        elapsed_s = time.perf_counter() - run_start
        if step % cfg.log_every == 0 or step == 1 or step == total_steps:
            tps = window_tokens / max(window_time, 1e-9)
            log.write({"step": step, "tokens": step * per_step * T, "lr": cfg.lr * factor, "train_loss": train_loss,
                       "tokens_per_s": tps, "elapsed_s": elapsed_s})
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            window_time, window_tokens = 0.0, 0
        if bar is not None:
            bar.update(1)
        if step % eval_every == 0 or step == total_steps:
            val_loss = validate()
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}", refresh=False)
        if step % ckpt_every == 0 or step == stop:
            save_checkpoint()
    if bar is not None:
        bar.close()

    if step < total_steps:  # stopped early on purpose (stop_at_step): resumable
        D.barrier(info)
        return {"stopped_at_step": step, "total_steps": total_steps}

    # ---- final model (Hugging Face format) and run.json
    model_sd, _ = D.full_state(wrapped, optimizer, info) if info.fsdp else (None, None)
    result = {"attention": cfg.attention, "size": cfg.size if not cfg.init_from else Path(cfg.init_from).name,
              "seed": cfg.seed, "config": run_config, "parameters": counts,
              "tokens_per_s": step * per_step * T / max(train_time_s, 1e-9), "final_val_loss": val_loss,
              "final_val_ppl": math.exp(min(val_loss, 700.0)), "tokens": step * per_step * T,
              "steps": step, "train_time_s": train_time_s, "elapsed_s": elapsed_s}
    if info.is_main:
        final = model
        if model_sd is not None:  # FSDP: rebuild an unsharded copy on rank 0
            final = _rebuild(cfg, len(tokenizer), ssa)
            final.load_state_dict(model_sd)
        tmp_dir = out / ".final.tmp"
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        final.to("cpu").save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        if (out / "final").exists():
            shutil.rmtree(out / "final")
        os.replace(tmp_dir, out / "final")
        final.to(info.device)
        atomic_write_json(out / "run.json", result)
    D.barrier(info)
    return result


def _rebuild(cfg: TrainConfig, vocab: int, ssa: SSAConfig | None) -> torch.nn.Module:
    if cfg.init_from:
        return with_attention(_load_init(cfg.init_from), cfg.attention, ssa)
    return build_model(cfg.size, vocab, cfg.seq_len, cfg.attention, ssa, cfg.seed)
