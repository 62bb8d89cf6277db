"""``ssa train --nproc N``: check what can be checked in this process, then re-run under ``torchrun``.

This process holds the run directory's lock for its children (they skip it: ``lock.ENV_HELD``), and a child's
one-line error comes back here through a file (``distributed.ENV_ERRORS``) instead of torchrun's traceback."""

from __future__ import annotations

import tempfile
from pathlib import Path

from selective_attention.data.tokens import prepare
from selective_attention.errors import UserError
from selective_attention.train import distributed, rundir
from selective_attention.train.config import TrainConfig
from selective_attention.utils.io import read_json


def launch(cfg: TrainConfig) -> dict:
    """Run ``cfg`` with ``cfg.nproc`` processes; returns OUT/run.json."""
    plan = rundir.plan_out_dir(cfg)  # a bad --out fails here, in one line, before spawning anything; locks OUT
    try:
        if plan.kind == "done":
            assert plan.result is not None  # a finished run: its run.json, read while planning
            return plan.result
        plan.state = None  # the children read the checkpoint themselves
        prepare(
            cfg.data,
            cfg.tokenizer_kind,
            cfg.vocab_size,
            cfg.init_from,
            cfg.split_seed,
            cfg.cache_dir,
            splits=("train", "val"),
        )  # a bad corpus fails here too; fills the token cache once for all
        import yaml

        with tempfile.TemporaryDirectory(prefix="ssa-train-") as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump({**cfg.to_dict(), "nproc": cfg.nproc}))
            code, errors = distributed.launch(cfg.nproc, str(path), plan.out)
        if code != 0:
            if errors:
                rank, msg = errors[0]
                raise UserError(f"{msg} (process {rank} of {cfg.nproc} exited with code {code})")
            raise UserError(f"torchrun with {cfg.nproc} processes failed (exit code {code}); see the messages above")
        if not (plan.out / "run.json").is_file():  # stopped on purpose (--stop-at-step): resumable, no result yet
            return {"stopped_at_step": cfg.stop_at_step, "total_steps": cfg.total_steps(cfg.nproc)}
        return read_json(plan.out / "run.json", "the result of the run")
    except BaseException:
        plan.abandon()
        raise
    finally:
        plan.release()
