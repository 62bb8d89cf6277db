"""``ssa train``: train a language model (any attention method) from scratch, or fine-tune a pretrained one.

Settings come from TrainConfig's defaults, then ``--config FILE.yaml`` (keys = TrainConfig fields; SSA settings
nested under ``ssa:``), then the options given on the command line (the SSA flags come from SSAConfig's fields:
``cli.ssa_flags``). ``--nproc N`` re-launches the same run under ``torchrun`` with N
processes (DDP; ``--fsdp`` shards instead); ``torchrun ... -m selective_attention train ...`` works as well.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from selective_attention.cli.ssa_flags import add_ssa_arguments, ssa_args_given
from selective_attention.errors import UserError, first_line

if TYPE_CHECKING:
    from selective_attention.train.config import TrainConfig

# Ctrl-C: the run directory keeps its checkpoints, and the same command continues from the newest one
INTERRUPTED_HINT = "run the same command again to resume from the last checkpoint (if one was written)"

# option -> (TrainConfig field, type, help); every default is None so that we can tell what was given
OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", str, "corpus: wiki (default), sotu, a .txt/.jsonl file, a folder, or hf:NAME[:CONFIG]"),
    (
        "--attention",
        "attention",
        str,
        "attention method: vanilla (default), ssa, ssa-pos, const, yarn, ssmax, freq, llama4, gated",
    ),
    ("--size", "size", str, "model size: tiny (default), small, gpt2-124m, pythia-160m"),
    ("--max-tokens", "max_tokens", int, "training tokens (default 1,000,000)"),
    ("--seed", "seed", int, "seed of the initialisation and the data order (default 0)"),
    ("--out", "out", str, "run directory (metrics.jsonl, checkpoints/, final/, run.json)"),
    (
        "--init-from",
        "init_from",
        str,
        "fine-tune a pretrained model: a Hugging Face folder, a .gguf file, or smollm2-135m (the bundled SmolLM2-135M)",
    ),
    ("--nproc", "nproc", int, "processes (torchrun; gloo on CPU, NCCL on GPU); default 1"),
    ("--seq-len", "seq_len", int, "tokens per sequence (default 256)"),
    (
        "--packing",
        "packing",
        str,
        "stitched (default: windows run across documents) or documents (attention and "
        "positions restart at every document of a window)",
    ),
    ("--batch-size", "batch_size", int, "sequences per micro-batch per process (default 8)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step (default 1)"),
    ("--lr", "lr", float, "peak learning rate (default 1e-3)"),
    (
        "--temperature-lr",
        "temperature_lr",
        float,
        "learning rate of the temperature parameters (default: 1e-2 with --init-from; from scratch lr, "
        "10x lr for ssa-official)",
    ),
    ("--min-lr-ratio", "min_lr_ratio", float, "final learning rate / peak (cosine; default 0.1)"),
    ("--warmup", "warmup", int, "warmup optimizer steps (default 5%% of the steps)"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay of the matrices (default 0.1)"),
    ("--clip", "clip", float, "gradient-norm clipping (default 1.0)"),
    ("--eval-every", "eval_every", int, "optimizer steps between validations (default 100; 0: at the end)"),
    ("--eval-tokens", "eval_tokens", int, "validation tokens per evaluation (default 65536)"),
    ("--checkpoint-every", "checkpoint_every", int, "optimizer steps between checkpoints (default: eval-every)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "checkpoints kept, the newest (default 2)"),
    ("--log-every", "log_every", int, "optimizer steps between metric lines (default 10)"),
    ("--tokenizer", "tokenizer", str, "bpe (trained on the train split; default), gpt2, or pretrained"),
    ("--vocab-size", "vocab_size", int, "BPE vocabulary (default 8192)"),
    ("--split-seed", "split_seed", int, "seed of the train/val/test document split (default 0)"),
    ("--cache-dir", "cache_dir", str, "token cache (default $SSA_CACHE_DIR or ~/.cache/selective_attention)"),
    ("--precision", "precision", str, "auto (bf16 autocast on CUDA; default), fp32 or bf16"),
    ("--device", "device", str, "auto (default), cpu or cuda"),
    ("--stop-at-step", "stop_at_step", int, "checkpoint and stop after this step (resume by running again)"),
]
SWITCHES: list[tuple[str, str, str]] = [
    ("compile", "compile", "torch.compile the model for the training steps (default off)"),
    ("fsdp", "fsdp", "shard with FSDP instead of DDP (with --nproc > 1)"),
    ("progress", "progress", "progress bar (default on)"),
    (
        "overwrite",
        "overwrite",
        "replace an earlier run in --out: delete the files it wrote (default: resume it, or refuse if it differs)",
    ),
    (
        "temperatures-only",
        "temperatures_only",
        "train only the SSA temperature parameters; the base weights stay frozen (default off)",
    ),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def error(message: str) -> NoReturn:  # one line, no usage block (argparse's own error prints two)
        print(f"ssa train: error: {message}", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of training settings (TrainConfig keys)")
    for flag, dest, typ, help_text in OPTIONS:
        parser.add_argument(flag, dest=dest, type=typ, default=None, help=help_text)
    for name, dest, help_text in SWITCHES:
        parser.add_argument(f"--{name}", dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    parser.add_argument(
        "--method-option",
        dest="method_options",
        action="append",
        metavar="KEY=VALUE",
        default=None,
        help="an option of the attention method (repeatable), e.g. beta=0.2",
    )
    add_ssa_arguments(
        parser.add_argument_group("SSA temperatures (methods ssa, ssa-pos)"),
        help_overrides={"init": "identity or scratch (default: scratch from scratch, identity with --init-from)"},
    )


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of training settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _method_options(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--method-option expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from selective_attention.train.config import LEGACY_SSA_KEYS, TrainConfig

    settings: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for _, dest, _, _ in OPTIONS:
        if getattr(args, dest, None) is not None:
            settings[dest] = getattr(args, dest)
    for _, dest, _ in SWITCHES:
        if getattr(args, dest, None) is not None:
            settings[dest] = getattr(args, dest)
    if args.method_options:
        settings["method_options"] = {**(settings.get("method_options") or {}), **_method_options(args.method_options)}
    flags = ssa_args_given(args)
    if flags:  # flags override the file's ssa: {...} (or its older flat keys), field by field
        ssa = settings.get("ssa") or {}
        if not isinstance(ssa, dict):
            raise UserError(f"--config: ssa must be a mapping of SSA settings, got {ssa!r}")
        legacy = {LEGACY_SSA_KEYS[k]: settings.pop(k) for k in list(settings) if k in LEGACY_SSA_KEYS}
        settings["ssa"] = {**ssa, **{k: v for k, v in legacy.items() if v is not None}, **flags}
    if isinstance(settings.get("init_from"), str):  # a bundled model's name (smollm2-135m) -> its file
        from selective_attention.utils.packages import BUNDLED_MODELS, resolve_model

        if settings["init_from"] in BUNDLED_MODELS:
            settings["init_from"] = str(resolve_model(settings["init_from"]))
    cfg = TrainConfig.from_dict(settings)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    from selective_attention.train import distributed, train

    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except Exception as e:  # a process of `--nproc N`: the parent prints one line for all of them
        if not os.environ.get("SSA_DEBUG"):
            text = first_line(e)
            if distributed.report_error(text if isinstance(e, UserError) else f"{type(e).__name__}: {text}"):
                return 2 if isinstance(e, UserError) else 1
        raise
    if "stopped_at_step" in result:
        print(
            f"stopped after step {result['stopped_at_step']} of {result['total_steps']}: run the same command "
            "again to continue",
            file=sys.stderr,
        )
        return 0
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("SSA_LAUNCHED"):
        print(
            f"{cfg.out}: {result['attention']} {result['size']}, {result['tokens']:,} tokens, "
            f"val loss {result['final_val_loss']:.4f} (ppl {result['final_val_ppl']:.2f}), "
            f"{result['tokens_per_s']:,.0f} tokens/s; model in {Path(cfg.out) / 'final'}"
        )
    return 0
