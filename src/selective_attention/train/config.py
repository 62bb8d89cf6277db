"""TrainConfig: everything a training run depends on, its validation, and the loading of older config layouts.

The SSA switches are one nested ``SSAConfig`` (field ``ssa``), not copies of its fields. YAML / dicts accept
``ssa: {sharing: mlp, ...}``; the flat keys of the older layout (``sharing:``, ``query:``, ``ssa_init:`` ...)
still load and are mapped onto it (``LEGACY_SSA_KEYS``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.train.data import PACKINGS
from selective_attention.utils.packages import resolve_model

FINETUNE_TEMPERATURE_LR = 1e-2  # the official SSA fine-tuning recipe (weights at 1e-5)
# From scratch the official form's temperatures train at this many times the base rate unless temperature_lr says
# otherwise: its c = exp(-exp(beta)) cannot leave ~0 at 1x, and at 10x it was the configuration search's choice
# (ssa-official-t10, docs/results.md). Every other method's train at the base rate (what the search found best or
# no worse for SSA's own c = 0.5 start).
SCRATCH_TEMPERATURE_LR_FACTOR = {"ssa-official": 10}
# Fine-tuning: the temperatures already train at 1e-2, so c = 1 x theta moves ~1e-2 per step, as from scratch
# (10 x a base rate of ~1e-3); 10 x 1e-2 would move c by 0.1 per step.
FINETUNE_POSITION_SCALE = 1.0
# Fields that may differ between an interrupted run and its resumption (they do not change the result).
# ``out`` is the run directory itself (it may be named differently, ./C or C, or moved).
RESUME_FREE = {"progress", "overwrite", "stop_at_step", "cache_dir", "keep_checkpoints", "nproc", "log_every", "out"}
PATH_FIELDS = ("data", "init_from")  # compared resolved (a run records them in its manifest)
# older flat key -> SSAConfig field
LEGACY_SSA_KEYS = {
    "sharing": "sharing",
    "query": "query",
    "value": "value",
    "key": "key",
    "token_aware": "token_aware",
    "position_aware": "position_aware",
    "value_position_aware": "value_position_aware",
    "ssa_init": "init",
    "mlp_hidden": "mlp_hidden",
}
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything a training run depends on; the ``ssa train`` options and YAML config keys mirror these."""

    data: str = "wiki"
    attention: str = "vanilla"  # a method of the registry (methods/): vanilla | ssa | ssmax | ...
    size: str = "tiny"  # tiny | small | gpt2-124m | pythia-160m (ignored with init_from)
    max_tokens: int = 1_000_000  # training tokens (rounded up to whole optimizer steps)
    seed: int = 0
    out: str = "runs/train"
    seq_len: int = 256
    # stitched: windows cut across documents, attention and positions run across them; documents: attention and
    # positions (RoPE, SSA's p) restart at every document of a window (train/data.py)
    packing: str = "stitched"
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    # None: FINETUNE_TEMPERATURE_LR with init_from; from scratch lr (x SCRATCH_TEMPERATURE_LR_FACTOR's factor)
    temperature_lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int | None = None  # optimizer steps; None: 5% of the steps
    weight_decay: float = 0.1
    clip: float = 1.0
    temperatures_only: bool = False  # train only the SSA temperature parameters (the base weights stay frozen)
    eval_every: int = 100  # optimizer steps between validations (0: only at the end)
    eval_tokens: int = 65536  # validation tokens per evaluation (from the start of the val split)
    checkpoint_every: int | None = None  # optimizer steps between checkpoints; None: eval_every
    keep_checkpoints: int = 2
    log_every: int = 10
    init_from: str | None = None  # a Hugging Face model folder or a .gguf file
    # SSA temperatures (methods that use SSA). None: SSAConfig() with init "identity" under init_from, "scratch"
    # from scratch. A dict is accepted and completed the same way (a missing "init" follows init_from).
    ssa: SSAConfig | None = None
    method_options: dict[str, Any] = field(default_factory=dict)  # JSON options of the method (methods)
    # data
    tokenizer: str | None = None  # bpe | gpt2 | pretrained; None: bpe from scratch, pretrained with init_from
    vocab_size: int = 8192
    split_seed: int = 0  # the corpus split (kept apart from seed so that every run shares one split)
    cache_dir: str | None = None
    # machinery
    precision: str = "auto"  # auto (bf16 autocast on CUDA, else fp32) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model for the training steps
    nproc: int = 1  # > 1: relaunch under torchrun with this many processes
    fsdp: bool = False
    progress: bool = True
    overwrite: bool = False
    stop_at_step: int | None = None  # checkpoint and stop after this step, as if interrupted; rerun to resume

    def __post_init__(self) -> None:
        if isinstance(self.ssa, dict):
            self.ssa = _ssa_from_dict(self.ssa, self.init_from)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From a YAML / saved mapping: nested ``ssa: {...}`` or the older flat SSA keys."""
        d = dict(d)
        flat = {LEGACY_SSA_KEYS[k]: d.pop(k) for k in list(d) if k in LEGACY_SSA_KEYS}
        flat = {k: v for k, v in flat.items() if v is not None}  # ssa_init: null meant "the default"
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown training option(s): {', '.join(unknown)}")
        ssa = d.get("ssa")
        if flat:
            if isinstance(ssa, SSAConfig):
                ssa = ssa.to_dict()
            if ssa is not None and not isinstance(ssa, dict):
                raise UserError(f"ssa: expected a mapping of SSAConfig fields, got {ssa!r}")
            d["ssa"] = {**(ssa or {}), **flat}
        elif ssa is not None and not isinstance(ssa, (dict, SSAConfig)):
            raise UserError(f"ssa: expected a mapping of SSAConfig fields, got {ssa!r}")
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"invalid training settings: {e}") from None

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> TrainConfig:
        """The config of a saved run (checkpoint or run.json ``config``; extra run keys such as world_size are
        dropped). Older layouts load: flat SSA keys, a resolved ``ssa`` dict with the retired temperature_lr."""
        names = {f.name for f in dataclasses.fields(cls)} | set(LEGACY_SSA_KEYS)
        d = {k: v for k, v in d.items() if k in names}
        if d.get("temperature_lr") is None and not d.get("init_from"):  # saved before runs recorded it resolved:
            d["temperature_lr"] = d.get("lr", cls.lr)  # from scratch it was the base rate for every method then
        if isinstance(d.get("ssa"), dict):  # run.json holds the resolved SSAConfig: it wins over flat keys
            d = {k: v for k, v in d.items() if k not in LEGACY_SSA_KEYS}
        return cls.from_dict(d)

    def resolved(self) -> TrainConfig:
        """This config with the defaults that depend on the kind of run filled in (the temperature lr; from scratch
        the SSA config of a method that uses one): what a run records, so that a later change of a default changes
        neither how its saved runs resume nor how they read. A fine-tune's ``ssa`` stays as given: with an SSA
        model as its start, None means that model's own config, which the config alone does not know."""
        ssa = self.ssa_config() if _uses_ssa(self.attention) and not self.init_from else self.ssa
        return dataclasses.replace(self, ssa=ssa, temperature_lr=self.effective_temperature_lr())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def effective_temperature_lr(self) -> float:
        """From scratch the temperatures train at the base rate (10x lost 5 % val ppl in the ablation harness, and
        was worse for SSA's c = 0.5 start in the search), the official form's at 10x (SCRATCH_TEMPERATURE_LR_FACTOR);
        a fine-tune follows the official recipe's 1e-2, since at a fine-tuning lr (~1e-5) they would not move."""
        if self.temperature_lr is not None:
            return self.temperature_lr
        if self.init_from:
            return FINETUNE_TEMPERATURE_LR
        return self.lr * SCRATCH_TEMPERATURE_LR_FACTOR.get(self.attention, 1)

    def ssa_config(self) -> SSAConfig:
        """``ssa`` resolved: the default init follows init_from (identity fine-tuning, scratch from scratch)."""
        if self.ssa is None:
            return (
                SSAConfig(init="identity", position_scale=FINETUNE_POSITION_SCALE)
                if self.init_from
                else SSAConfig(init="scratch")
            )
        if isinstance(self.ssa, dict):
            return _ssa_from_dict(self.ssa, self.init_from)
        return self.ssa

    def resolved_paths(self) -> dict[str, str | None]:
        """The path settings as absolute paths (a corpus name such as ``wiki`` stays as it is), and ``out``."""
        d = {k: _resolve(getattr(self, k)) for k in PATH_FIELDS}
        d["out"] = str(Path(self.out).expanduser().resolve())
        return d

    def total_steps(self, world: int | None = None) -> int:
        """Optimizer steps of the run with ``world`` processes (default nproc): max_tokens in whole steps."""
        per_step = self.batch_size * self.grad_accum * (world or self.nproc) * self.seq_len
        return max(1, math.ceil(self.max_tokens / per_step))

    def warmup_steps(self, world: int | None = None) -> int:
        return self.warmup if self.warmup is not None else max(1, self.total_steps(world) // 20)

    def comparable(self, paths: dict[str, Any] | None = None) -> dict[str, Any]:
        """What must match for a run directory to be resumed (SSA settings only where the method uses them).
        Paths compare resolved: ``paths`` (a run manifest's) or this config's own, resolved from the cwd."""
        d = {k: v for k, v in self.resolved().to_dict().items() if k not in RESUME_FREE}
        resolved = self.resolved_paths()
        for k in PATH_FIELDS:
            d[k] = paths[k] if paths and k in paths else resolved[k]
        d["ssa"] = self.ssa_config().to_dict() if _uses_ssa(self.attention) else None
        return d

    def validate(self) -> None:
        """Raise UserError for an invalid value (before anything is read or written)."""
        from selective_attention.methods import get_method
        from selective_attention.train.models import SIZES

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(
            self.attention in _method_names(),
            f"--attention must be one of {', '.join(_method_names())}, got {self.attention!r}",
        )
        need(
            self.init_from is not None or self.size in SIZES,
            f"unknown --size {self.size!r}: use one of {', '.join(SIZES)}",
        )
        for name in (
            "max_tokens",
            "seq_len",
            "batch_size",
            "grad_accum",
            "nproc",
            "vocab_size",
            "log_every",
            "keep_checkpoints",
            "eval_tokens",
        ):
            v = getattr(self, name)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                f"--{name.replace('_', '-')} must be a positive integer, got {v!r}",
            )
        for name in ("lr", "clip"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"--{name} must be > 0, got {v!r}")
        need(
            self.temperature_lr is None or (math.isfinite(self.temperature_lr) and self.temperature_lr >= 0),
            f"--temperature-lr must be >= 0, got {self.temperature_lr!r}",
        )
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(self.warmup is None or self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        need(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1, "--checkpoint-every must be >= 1")
        need(self.stop_at_step is None or self.stop_at_step >= 1, "--stop-at-step must be >= 1")
        need(
            isinstance(self.temperatures_only, bool),
            f"temperatures_only must be true or false, got {self.temperatures_only!r}",
        )
        need(
            not (self.temperatures_only and self.attention == "vanilla"),
            "--temperatures-only trains only the SSA temperatures: --attention vanilla has none (use ssa)",
        )
        need(self.packing in PACKINGS, f"--packing must be {' or '.join(PACKINGS)}, got {self.packing!r}")
        need(self.precision in PRECISIONS, f"--precision must be auto, fp32 or bf16, got {self.precision!r}")
        need(self.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {self.device!r}")
        need(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")
        need(isinstance(self.method_options, dict), f"method_options must be a mapping, got {self.method_options!r}")
        tok = self.tokenizer_kind
        need(tok in ("bpe", "gpt2", "pretrained"), f"--tokenizer must be bpe, gpt2 or pretrained, got {tok!r}")
        need(tok != "pretrained" or self.init_from is not None, "--tokenizer pretrained needs --init-from")
        need(
            self.init_from is None or tok == "pretrained",
            "--init-from fine-tunes a pretrained model with its own tokenizer: drop --tokenizer",
        )
        need(
            self.ssa is None or isinstance(self.ssa, (SSAConfig, dict)),
            f"ssa: expected SSAConfig fields, got {self.ssa!r}",
        )
        self.ssa_config()
        get_method(self.attention).check_options(self.method_options)
        if self.init_from is not None and not resolve_model(self.init_from).exists():  # a bundled name resolves
            raise UserError(f"--init-from: not found: {self.init_from}")
        steps = self.total_steps()
        need(
            self.warmup is None or self.warmup <= steps,
            f"--warmup {self.warmup} is longer than the run ({steps} optimizer steps of "
            f"{self.batch_size * self.grad_accum * self.nproc * self.seq_len:,} tokens for --max-tokens "
            f"{self.max_tokens:,}): lower --warmup or raise --max-tokens",
        )

    @property
    def tokenizer_kind(self) -> str:
        return self.tokenizer or ("pretrained" if self.init_from else "bpe")


def _method_names() -> tuple[str, ...]:
    from selective_attention.methods import METHODS

    return tuple(METHODS)


def _resolve(path: str | None) -> str | None:
    """An existing path made absolute; anything else (a corpus name, hf:NAME, None) as given."""
    if path is None or str(path).startswith("hf:"):
        return path
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def _uses_ssa(attention: str) -> bool:
    """Whether the method ``attention`` is configured by TrainConfig.ssa (False for an unknown name)."""
    from selective_attention.methods import get_method

    return attention in _method_names() and get_method(attention).uses_ssa


def _ssa_from_dict(d: dict[str, Any], init_from: str | None) -> SSAConfig:
    """A (partial) SSAConfig mapping; a missing or null ``init`` follows init_from."""
    d = {k: v for k, v in d.items() if not (k == "init" and v is None)}
    d.setdefault("init", "identity" if init_from else "scratch")
    if init_from:
        d.setdefault("position_scale", FINETUNE_POSITION_SCALE)
    try:
        return SSAConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise UserError(f"ssa: {e}") from None
