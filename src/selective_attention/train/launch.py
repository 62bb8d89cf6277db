"""``ssa train --nproc N``: check what can be checked in this process, then re-run under ``torchrun``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from selective_attention.data.tokens import prepare
from selective_attention.errors import UserError
from selective_attention.train import distributed as D
from selective_attention.train import rundir
from selective_attention.train.config import TrainConfig


def launch(cfg: TrainConfig) -> dict:
    """Run ``cfg`` with ``cfg.nproc`` processes; returns OUT/run.json."""
    rundir.plan_out_dir(cfg)  # a bad --out, corpus or vocabulary fails here, in one line, before spawning anything
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
