"""The run directory: whether OUT is a fresh, resumable or finished run, clearing it, the metrics log, the
checkpoints (model, optimizer, RNG state) and the resume bookkeeping.

    OUT/metrics.jsonl, OUT/checkpoints/step-XXXXXXXX.pt (+ OUT/checkpoints/latest), OUT/final/, OUT/run.json
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selective_attention.errors import UserError
from selective_attention.train.config import TrainConfig
from selective_attention.utils.io import atomic_torch_save, atomic_write_text

CHECKPOINT_FORMAT = 1


def latest_checkpoint(out: Path) -> Path | None:
    latest = out / "checkpoints" / "latest"
    if latest.is_file():
        p = out / "checkpoints" / latest.read_text().strip()
        if p.is_file():
            return p
    return None


def _saved_comparable(saved: dict[str, Any], out: str) -> dict[str, Any]:
    try:
        return TrainConfig.from_saved(saved).comparable()
    except UserError as e:
        raise UserError(f"--out {out} holds a run whose settings cannot be read ({e}): choose another directory "
                        "or pass --overwrite") from None


def plan_out_dir(cfg: TrainConfig) -> tuple[str, Path | None]:
    """"fresh", "resume" (with its checkpoint) or "done"; UserError when OUT holds something else."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {cfg.out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return "fresh", None
    if cfg.overwrite:
        return "fresh", None
    run_json = out / "run.json"
    ckpt = latest_checkpoint(out)
    if ckpt is None and not run_json.is_file():
        raise UserError(f"--out {cfg.out} is not empty and holds no run of ours: choose another directory "
                        "(or --overwrite)")
    saved = json.loads(run_json.read_text())["config"] if run_json.is_file() else \
        torch.load(ckpt, map_location="cpu", weights_only=False)["config"]
    saved_c, current = _saved_comparable(saved, cfg.out), cfg.comparable()
    diff = sorted(k for k in current if saved_c.get(k) != current[k])
    if diff:
        raise UserError(f"--out {cfg.out} holds a run with other settings ({', '.join(diff)}): choose another "
                        "directory or pass --overwrite")
    return ("done", None) if run_json.is_file() else ("resume", ckpt)


def clear_out_dir(out: Path) -> None:
    """Remove what an earlier run of ours wrote (only our own files, never anything else)."""
    for name in ("checkpoints", "final"):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("metrics.jsonl", "run.json"):
        if (out / name).exists():
            (out / name).unlink()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


class MetricsLog:
    """Appends one JSON line per record to OUT/metrics.jsonl (only on the main process)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, state: dict[str, Any], keep: int) -> Path:
    """Write OUT/checkpoints/step-XXXXXXXX.pt (with the RNG state added), point ``latest`` at it, keep ``keep``."""
    name = f"step-{state['step']:08d}.pt"
    path = atomic_torch_save({"format": CHECKPOINT_FORMAT, **state, "rng": rng_state()}, out / "checkpoints" / name)
    atomic_write_text(out / "checkpoints" / "latest", name + "\n")
    for old in sorted((out / "checkpoints").glob("step-*.pt"))[: -keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)
