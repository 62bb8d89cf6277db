"""The run directory: what OUT holds, which of its files are the tool's own, and whether it is a fresh, resumable
or finished run (the plan, made under OUT's lock).

    OUT/ssa-run.json     the manifest, written when the run starts: format version, settings, resolved paths,
                         and every file the run wrote (checkpoints and final files with size and sha256)
    OUT/.lock            flock'ed by the run that uses OUT (PID inside)
    OUT/metrics.jsonl    one JSON line per log / validation (train.metrics_log)
    OUT/checkpoints/step-XXXXXXXX.safetensors (+ latest, a pointer for people: resume scans, it never trusts it)
    OUT/final/           the Hugging Face model + tokenizer, OUT/run.json  the result (only once finished)

A run directory is recognised by its manifest (or, for directories of older versions, by run.json or
checkpoints/step-*.pt). ``--overwrite`` removes only files the run wrote; anything else in OUT is refused, and a
refusal offers ``--overwrite`` only where it would be accepted. The main process writes OUT through
``train.writer.RunDir``; checkpoint files are ``train.checkpoint``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError, first_line
from selective_attention.train import checkpoint as ckpt_io
from selective_attention.train.config import TrainConfig
from selective_attention.train.lock import LOCK_NAME, RunLock

# re-exported: experiments and tests read the metrics log through train.rundir
from selective_attention.train.metrics_log import read_metrics as read_metrics

MANIFEST = "ssa-run.json"
MANIFEST_FORMAT = 1
CKPT_RE = re.compile(r"^step-(\d{8})\.(safetensors|pt)$")
# temporary names of our atomic writes (utils.io: .NAME.XXXX.tmp) and of the final/ folder being written
TEMP_RE = re.compile(r"^\.(step-\d{8}\.(safetensors|pt)|latest|run\.json|ssa-run\.json|metrics\.jsonl)\..*\.tmp$")
FINAL_TMP = ".final.tmp"
OWN_NAMES = {MANIFEST, LOCK_NAME, "metrics.jsonl", "run.json"}


def warn(msg: str) -> None:
    print(f"ssa train: warning: {msg}", file=sys.stderr)


# ---- what OUT holds


def checkpoint_files(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in OUT/checkpoints, newest first (a .safetensors before a .pt)."""
    d = out / "checkpoints"
    if not d.is_dir():
        return []
    found = [
        (int(m.group(1)), m.group(2) == "safetensors", p)
        for p in d.iterdir()
        if (m := CKPT_RE.match(p.name)) and p.is_file()
    ]
    return [(s, p) for s, _, p in sorted(found, key=lambda x: (x[0], x[1]), reverse=True)]


def read_manifest(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), (None, None) when there is none, (None, problem) when it cannot be read."""
    path = out / MANIFEST
    if not path.is_file():
        return None, None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{path}: not readable JSON ({first_line(e)})"
    if not isinstance(m, dict) or m.get("format") != "ssa-run" or not isinstance(m.get("files"), dict):
        return None, f"{path}: not a run manifest of ssa train"
    if int(m.get("version", 0)) > MANIFEST_FORMAT:
        raise UserError(
            f"{path}: run format {m['version']} is newer than this version of ssa train reads "
            f"({MANIFEST_FORMAT}): update selective-attention"
        )
    return m, None


def read_result(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(run.json, None) when the run finished with a finite result; (None, why not) otherwise."""
    path = out / "run.json"
    if not path.is_file():
        return None, None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        loss = float(result["final_val_loss"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{path} is not a readable result ({type(e).__name__})"
    if not math.isfinite(loss):
        return None, f"{path} holds a non-finite final validation loss ({loss})"
    if not (out / "final").is_dir():
        return None, f"{out / 'final'} is missing"
    return result, None


def own_files(out: Path, manifest: dict[str, Any] | None) -> tuple[list[Path], list[Path]]:
    """(files the tool wrote, anything else) in OUT: the manifest's files, the tool's own names, its checkpoint
    and temporary names; for an older run directory without a manifest, final/ counts as its own as well."""
    listed = {out / k for k in (manifest or {}).get("files", {})}
    ours: list[Path] = []
    other: list[Path] = []
    for p in sorted(out.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(out)
        top = rel.parts[0]
        mine = (
            p in listed
            or (len(rel.parts) == 1 and (p.name in OWN_NAMES or TEMP_RE.match(p.name)))
            or (
                top == "checkpoints"
                and len(rel.parts) == 2
                and (CKPT_RE.match(p.name) or p.name == "latest" or TEMP_RE.match(p.name))
            )
            or top == FINAL_TMP
            or (manifest is None and top == "final")
        )
        (ours if mine else other).append(p)
    return ours, other


def clean_temporaries(out: Path) -> list[Path]:
    """Remove what a write interrupted by a kill left: .NAME.XXXX.tmp files of ours and .final.tmp/."""
    removed: list[Path] = []
    for d in (out, out / "checkpoints"):
        if d.is_dir():
            for p in d.iterdir():
                if TEMP_RE.match(p.name) and p.is_file():
                    p.unlink()
                    removed.append(p)
    if (out / FINAL_TMP).is_dir():
        shutil.rmtree(out / FINAL_TMP)
        removed.append(out / FINAL_TMP)
    return removed


def clear_out_dir(out: Path, manifest: dict[str, Any] | None) -> None:
    """Remove what an earlier run wrote: the manifest's files and the tool's own names, never anything else."""
    ours, _ = own_files(out, manifest)
    for p in ours:
        if p.name != LOCK_NAME:
            p.unlink(missing_ok=True)
    for d in (out / "final", out / "checkpoints", out / FINAL_TMP):
        if d.is_dir():
            for sub in sorted(d.rglob("*"), reverse=True):
                if sub.is_dir() and not any(sub.iterdir()):
                    sub.rmdir()
            if not any(d.iterdir()):
                d.rmdir()


# ---- the plan: fresh, resume or done


@dataclass
class Plan:
    kind: str  # "fresh" | "resume" | "done"
    out: Path  # resolved
    checkpoint: Path | None = None
    state: dict[str, Any] | None = None  # the checkpoint's content (read and verified while planning)
    manifest: dict[str, Any] | None = None
    result: dict[str, Any] | None = None  # run.json of a finished run
    restart: bool = False  # fresh over files of ours (--overwrite, or a run killed before its first checkpoint)
    lock: RunLock | None = None
    created: Path | None = None  # the topmost directory this plan created (removed if the run writes nothing)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def abandon(self) -> None:
        """After a failure: remove OUT again if this run created it and wrote nothing but its lock there (only
        while holding that lock: another run's lock file is never removed)."""
        if self.created is None or not self.out.is_dir() or self.lock is None or not self.lock.held:
            return
        if all(p.name == LOCK_NAME for p in self.out.iterdir()):
            self.lock.discard(always=True)
            p = self.out
            try:
                p.rmdir()
                while p != self.created and not any(p.parent.iterdir()):
                    p = p.parent
                    p.rmdir()
            except OSError:  # another run has just opened OUT/.lock: OUT is its now
                pass


def _saved_settings(
    out: Path, manifest: dict[str, Any] | None, ckpts: list[tuple[int, Path]]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(config dict, resolved paths or None) of the run in OUT: its manifest, run.json or newest readable
    checkpoint (headers only)."""
    if manifest is not None:
        return manifest["config"], manifest.get("paths")
    if (out / "run.json").is_file():
        try:
            return json.loads((out / "run.json").read_text())["config"], None
        except (ValueError, KeyError, TypeError, OSError):
            pass
    problems = []
    for _, p in ckpts:
        try:
            return ckpt_io.read_settings(p), None
        except ckpt_io.CheckpointError as e:
            problems.append(str(e))
    raise UserError(f"the settings of the run in --out {out} cannot be read: {problems[0] if problems else ''}")


def _names(out: Path, paths: list[Path]) -> str:
    """The first few of ``paths``, relative to OUT, for a one-line message."""
    return ", ".join(str(p.relative_to(out)) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")


def _overwrite_hint(out: Path, manifest: dict[str, Any] | None, action: str) -> str:
    """The hint to pass --overwrite to ``action``, first asking to move away what the tool did not write when OUT
    holds such files (--overwrite refuses to remove them): following a hint never leads to a refusal."""
    _, other = own_files(out, manifest)
    move = f"move away the files that ssa train did not write ({_names(out, other)}) and " if other else ""
    return f"{move}pass --overwrite to {action}"


def _differences(
    saved: dict[str, Any], paths: dict[str, Any] | None, cfg: TrainConfig, out: Path, manifest: dict[str, Any] | None
) -> list[str]:
    try:
        saved_c = TrainConfig.from_saved(saved).comparable(paths)
    except UserError as e:
        raise UserError(
            f"--out {out} holds a run whose settings cannot be read ({e}): choose another directory or "
            + _overwrite_hint(out, manifest, "delete that run")
        ) from None
    current = cfg.comparable()
    return [
        f"{k}: {saved_c.get(k)!r} there, {current[k]!r} now" for k in sorted(current) if saved_c.get(k) != current[k]
    ]


def newest_intact(
    out: Path, manifest: dict[str, Any] | None, report: bool = True
) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest checkpoint that passes its checks (manifest size + sha256, else its own content checksum)
    with its state, and the problems of the newer ones (each warned about, naming the file)."""
    files = (manifest or {}).get("files", {})
    problems = []
    for _, path in checkpoint_files(out):
        try:
            state = ckpt_io.read(path, files.get(str(path.relative_to(out))), verify=True)
        except ckpt_io.CheckpointError as e:
            problems.append(str(e))
            continue
        if report:
            for p in problems:
                warn(f"skipping a damaged checkpoint: {p}; resuming from {path}")
        return path, state, problems
    return None, None, problems


def plan_out_dir(cfg: TrainConfig, main: bool = True) -> Plan:
    """Lock OUT (``main``), clean what an interrupted write left, and say what to do: "fresh", "resume" (from
    the newest intact checkpoint) or "done"; UserError when OUT holds something this run must not touch."""
    out = Path(cfg.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {cfg.out} exists and is not a directory")
    plan = Plan("fresh", out)
    if main:
        top = out
        while not top.parent.exists():
            top = top.parent
        plan.created = top if not out.exists() else None
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {cfg.out}: cannot create the directory ({e.strerror})") from None
        try:
            plan.lock = RunLock(out).acquire()
        except BaseException:
            plan.abandon()
            raise
    try:
        _plan(cfg, plan, main)
    except BaseException:
        plan.abandon()
        if plan.lock is not None:
            plan.lock.discard()
        raise
    return plan


def _plan(cfg: TrainConfig, plan: Plan, main: bool) -> None:
    out = plan.out
    if main:
        clean_temporaries(out)
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME] if out.is_dir() else []
    if not entries:
        return
    manifest, problem = read_manifest(out)
    ckpts = checkpoint_files(out)
    has_result = (out / "run.json").is_file()
    ours = manifest is not None or has_result or bool(ckpts)
    plan.manifest = manifest
    if cfg.overwrite:
        if not ours:
            raise UserError(
                f"--out {cfg.out} is not empty and holds no run of ours: --overwrite only replaces "
                "a run's own files; choose another directory"
            )
        _, other = own_files(out, manifest)
        if other:
            raise UserError(
                f"--out {cfg.out} holds files that ssa train did not write ({_names(out, other)}): --overwrite "
                "only removes a run's own files; move them or choose another directory"
            )
        plan.restart = True
        return
    if not ours:  # --overwrite would be refused as well: it only replaces a run of ssa train
        raise UserError(
            (problem if problem else f"--out {cfg.out} is not empty and holds no run of ours")
            + ": choose another directory (--overwrite only replaces a run of ssa train)"
        )
    if problem and main:
        warn(f"{problem}; recognising the run by its checkpoints")
    saved, paths = _saved_settings(out, manifest, ckpts)
    diff = _differences(saved, paths, cfg, out, manifest)
    if diff:
        raise UserError(
            f"--out {cfg.out} holds a run with other settings ({'; '.join(diff)}): choose another "
            "directory, or " + _overwrite_hint(out, manifest, "delete that run")
        )
    result, why = read_result(out)
    if result is not None:
        plan.kind, plan.result = "done", result
        return
    if why and main:
        warn(f"{why}: finishing the run again from its last checkpoint")
    path, state, problems = newest_intact(out, manifest, report=main)
    if path is not None:
        plan.kind, plan.checkpoint, plan.state = "resume", path, state
        return
    if problems:
        raise UserError(
            f"no intact checkpoint in {out / 'checkpoints'} ({'; '.join(problems)}): "
            + _overwrite_hint(out, manifest, "start the run again")
        )
    plan.restart = True  # our run, stopped before its first checkpoint: start it again
