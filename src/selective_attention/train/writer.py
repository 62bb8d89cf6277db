"""Writing OUT (the main process only): the manifest, checkpoints, final/ and run.json, each written atomically and
recorded in the manifest (``RunDir``); a full disk becomes a one-line error that names the file and the space.

What OUT holds and the plan that decides between fresh, resume and done: ``train.rundir``; the checkpoint file
format and the RNG state it carries: ``train.checkpoint``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selective_attention.errors import UserError
from selective_attention.train import checkpoint as ckpt_io
from selective_attention.train.config import TrainConfig
from selective_attention.train.metrics_log import truncate_metrics
from selective_attention.train.rundir import FINAL_TMP, MANIFEST, MANIFEST_FORMAT, Plan, checkpoint_files, clear_out_dir
from selective_attention.utils.files import disk_full_error, follow_umask, fsync_file, is_disk_full, require_space
from selective_attention.utils.io import atomic_write, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunDir:
    """OUT as the main process writes it; every write updates the manifest."""

    out: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def begin(cls, plan: Plan, cfg: TrainConfig, step: int) -> RunDir:
        """Write the manifest (fresh: after clearing our files when restarting; resume: adopting an older run's
        files when it has none) and drop metric lines logged after the checkpoint we resume from."""
        out = plan.out
        if plan.kind == "fresh" and plan.restart:
            clear_out_dir(out, plan.manifest)
        manifest = plan.manifest if plan.kind == "resume" and plan.manifest else None
        if manifest is None:
            manifest = {"format": "ssa-run", "version": MANIFEST_FORMAT, "created": _now(), "files": {}}
            if plan.kind == "resume":  # an older run directory: adopt its files (checked by their own format)
                for _, p in checkpoint_files(out):
                    manifest["files"][str(p.relative_to(out))] = {"size": p.stat().st_size}
        manifest.update(
            {"config": cfg.resolved().to_dict(), "paths": cfg.resolved_paths(), "state": "running", "updated": _now()}
        )
        manifest["paths"]["out"] = str(out)
        manifest["files"]["metrics.jsonl"] = {}
        rd = cls(out, manifest)
        out.mkdir(parents=True, exist_ok=True)
        rd.write_manifest()
        if plan.kind == "resume":
            truncate_metrics(out / "metrics.jsonl", step)
        return rd

    def write_manifest(self) -> None:
        self.manifest["updated"] = _now()
        _write(self.out / MANIFEST, lambda: atomic_write_json(self.out / MANIFEST, self.manifest), 1 << 16)

    def record(self, path: Path, info: dict[str, Any] | None) -> None:
        rel = str(path.relative_to(self.out))
        if info is None:
            self.manifest["files"].pop(rel, None)
        else:
            self.manifest["files"][rel] = info

    def newest_checkpoint(self) -> Path | None:
        files = checkpoint_files(self.out)
        return files[0][1] if files else None

    def save_checkpoint(self, state: dict[str, Any], keep: int) -> Path:
        """Write OUT/checkpoints/step-XXXXXXXX.safetensors (RNG state added) through a temporary file, record its
        size and sha256 in the manifest, then drop all but the ``keep`` newest."""
        ckdir = self.out / "checkpoints"
        ckdir.mkdir(exist_ok=True)
        state = {"format": ckpt_io.VERSION, **state, "rng": ckpt_io.rng_state()}
        path = ckdir / f"step-{state['step']:08d}{ckpt_io.SUFFIX}"
        needed = ckpt_io.nbytes(state) + (1 << 20)
        prev = self.newest_checkpoint()
        what = f"the last checkpoint is kept: {prev}" if prev else ""
        require_space(path, needed, what)
        record: dict[str, Any] = {}

        def write(tmp: str) -> None:
            ckpt_io.write(tmp, state)
            follow_umask([tmp])  # safetensors creates its files 0o600
            record.update(ckpt_io.file_record(tmp))  # what reached the disk, before it takes the real name

        _write(path, lambda: atomic_write(path, write), needed, what)
        self.record(path, {**record, "step": state["step"]})
        old = [p for _, p in checkpoint_files(self.out) if p != path][max(keep - 1, 0) :]
        for p in old:
            self.record(p, None)
        self.write_manifest()  # before the deletions: a kill in between leaves unlisted files of ours, not holes
        _write(ckdir / "latest", lambda: atomic_write_text(ckdir / "latest", path.name + "\n"), 1 << 12)
        for p in old:
            p.unlink(missing_ok=True)
        return path

    def save_final(self, model: PreTrainedModel, tokenizer: Any) -> Path:
        """OUT/final/: the Hugging Face model + tokenizer, written in OUT/.final.tmp then renamed."""
        tmp, final = self.out / FINAL_TMP, self.out / "final"
        needed = sum(p.numel() * p.element_size() for p in model.state_dict().values()) + (16 << 20)
        require_space(final, needed)

        def write() -> None:
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = [p for p in tmp.rglob("*") if p.is_file()]
            follow_umask(files)  # safetensors creates its files 0o600
            for p in files:
                fsync_file(p)

        _write(tmp, write, needed)
        for rel in [k for k in self.manifest["files"] if k.startswith("final/")]:
            self.manifest["files"].pop(rel)
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                self.manifest["files"]["final/" + str(p.relative_to(tmp))] = ckpt_io.file_record(p)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.write_manifest()
        return final

    def save_result(self, result: dict[str, Any]) -> None:
        path = self.out / "run.json"
        _write(path, lambda: atomic_write_json(path, result), 1 << 20)
        self.record(path, ckpt_io.file_record(path))
        self.manifest["state"] = "done"
        self.write_manifest()


def _write(path: Path, write: Callable[[], object], needed: int, what: str = "") -> None:
    """Run ``write()``; a full disk becomes a UserError that names ``path`` and the space it needs."""
    try:
        write()
    except UserError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full_error(path, needed, what=what) from None
        raise
