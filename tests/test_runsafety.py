"""Run directories and their safety: checkpoints that hold no code, a manifest and a lock, resume from the newest
intact checkpoint, no NaN result, refusals that never lead to data loss, --overwrite limited to a run's own
files, clear errors (torchrun, settings that cannot fit, a full disk), temporary files cleaned, the umask, and
SIGKILL at random moments (slow)."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from selective_attention.cli import main
from selective_attention.errors import UserError
from selective_attention.train import TrainConfig, train

SRC = Path(__file__).resolve().parents[1] / "src"


def read_checkpoint(path: Path, **kw) -> dict:
    from selective_attention.train import checkpoint

    return checkpoint.read(path, **kw)


def same_weights(a: str | Path, b: str | Path) -> None:
    from safetensors.torch import load_file

    wa, wb = (load_file(str(Path(r) / "final" / "model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def ckpts(out: str | Path) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").glob("step-*"))


@pytest.fixture
def ref(cfg, tmp_path_factory) -> TrainConfig:
    """cfg (4 steps, a checkpoint every step) and its uninterrupted run (in another directory)."""
    cfg.checkpoint_every = 1
    full = TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path_factory.mktemp("ref") / "full")})
    train(full)
    cfg.ref_out = full.out
    return cfg


def stopped(c: TrainConfig, step: int) -> None:
    assert train(TrainConfig(**{**c.to_dict(), "stop_at_step": step}))["stopped_at_step"] == step


# ---- 1. no code from a run directory is ever unpickled


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(path: Path, marker: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "step": 9, "config": config, "model": Evil(marker), "optimizer": {}}, path)


def test_a_checkpoint_that_runs_code_is_never_unpickled(ref, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    # an older run directory whose only checkpoint is a pickle that calls os.system: refused, naming the file
    legacy = tmp_path / "legacy"
    evil_checkpoint(legacy / "checkpoints" / "step-00000009.pt", marker, {**ref.to_dict(), "out": str(legacy)})
    (legacy / "checkpoints" / "latest").write_text("step-00000009.pt\n")
    code = main(_cli_same(TrainConfig(**{**ref.to_dict(), "out": str(legacy)})))
    assert not marker.exists()  # the old code ran os.system here
    err = capsys.readouterr().err.strip()
    assert code == 2 and "step-00000009.pt" in err and "never unpickled" in err and "\n" not in err
    # next to an intact checkpoint: skipped with a warning that names it; the run resumes and matches
    stopped(ref, 2)
    evil_checkpoint(Path(ref.out) / "checkpoints" / "step-00000003.pt", marker, ref.to_dict())
    (Path(ref.out) / "checkpoints" / "latest").write_text("step-00000003.pt\n")
    train(ref)
    assert not marker.exists()
    assert "step-00000003.pt: refused" in capsys.readouterr().err
    same_weights(ref.out, ref.ref_out)


def test_checkpoints_hold_tensors_and_json_only(ref):
    stopped(ref, 2)
    path = Path(ref.out) / "checkpoints" / "step-00000002.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = json.loads(meta["state"])
    assert state["step"] == 2 and state["config"]["lr"] == ref.lr
    assert {g["name"] for g in state["optimizer"]["param_groups"]} == {"decay", "no_decay"}
    manifest = json.loads((Path(ref.out) / "ssa-run.json").read_text())
    rec = manifest["files"]["checkpoints/step-00000002.safetensors"]
    assert rec["size"] == path.stat().st_size and len(rec["sha256"]) == 64 and rec["step"] == 2
    assert manifest["format"] == "ssa-run" and manifest["version"] == 1
    assert manifest["paths"]["out"] == str(Path(ref.out).resolve())


def test_an_older_pickle_checkpoint_still_resumes(metrics, ref):
    """A format-1 step-*.pt (torch.save of tensors, numpy / Python RNG state) in a directory without a manifest
    resumes through the weights-only loader, bit-exactly."""
    stopped(ref, 2)
    out = Path(ref.out)
    state = read_checkpoint(out / "checkpoints" / "step-00000002.safetensors")
    for p in out.glob("checkpoints/*"):
        p.unlink()
    (out / "ssa-run.json").unlink()
    torch.save(
        {k: v for k, v in state.items() if k not in ("val_loss", "val_step")} | {"format": 1},
        out / "checkpoints" / "step-00000002.pt",
    )
    (out / "checkpoints" / "latest").write_text("step-00000002.pt\n")
    train(ref)
    same_weights(ref.out, ref.ref_out)
    assert metrics(ref.out)[-1]["val_loss"] == metrics(ref.ref_out)[-1]["val_loss"]


# ---- 2. never a NaN result


def test_killed_after_the_final_checkpoint_finishes_with_the_real_loss(ref, capsys):
    train(ref)
    expected = json.loads((Path(ref.out) / "run.json").read_text())["final_val_loss"]
    (Path(ref.out) / "run.json").unlink()  # as if killed between the final checkpoint and run.json
    assert main(_cli_same(ref)) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and f"val loss {expected:.4f}" in out
    assert json.loads((Path(ref.out) / "run.json").read_text())["final_val_loss"] == expected
    # a run.json with NaN (written by an older version) is not a result: finished again from the checkpoint
    result = json.loads((Path(ref.out) / "run.json").read_text())
    (Path(ref.out) / "run.json").write_text(json.dumps({**result, "final_val_loss": float("nan")}))
    assert train(ref)["final_val_loss"] == expected


def _cli_same(c: TrainConfig) -> list[str]:
    """The CLI arguments of exactly ``c``'s run (a YAML file of its settings)."""
    import yaml

    path = Path(c.out).parent / f"{Path(c.out).name}.yaml"
    path.write_text(yaml.safe_dump(c.to_dict()))
    return ["train", "--config", str(path)]


def test_a_non_finite_final_loss_is_an_error(cfg, monkeypatch):
    from selective_attention.train import trainer

    monkeypatch.setattr(trainer, "evaluate_loss", lambda *a, **k: float("nan"))
    with pytest.raises(UserError, match=r"final validation loss is nan.*step-00000004\.safetensors"):
        train(cfg)
    assert not (Path(cfg.out) / "run.json").exists()


# ---- 3. refusals that led to data loss


def test_the_same_directory_under_another_name_is_the_same_run(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = Path(ref.data)
    (tmp_path / "corpus.txt").write_text(data.read_text())
    c = TrainConfig(**{**ref.to_dict(), "out": "C", "data": "corpus.txt"})
    first = train(c)
    again = TrainConfig(**{**ref.to_dict(), "out": "./C", "data": str(tmp_path / "corpus.txt")})
    assert train(again) == first  # done, not "other settings (out)"
    monkeypatch.chdir(tmp_path.parent)
    assert train(TrainConfig(**{**again.to_dict(), "out": str(tmp_path / "C")})) == first


def test_killed_before_the_first_checkpoint_starts_again(ref):
    train(ref)
    out = Path(ref.out)
    for name in ("checkpoints", "final"):
        for p in (out / name).iterdir():
            p.unlink()
        (out / name).rmdir()
    (out / "run.json").unlink()  # manifest + metrics.jsonl: a run killed before its first checkpoint
    train(ref)
    same_weights(ref.out, ref.ref_out)


@pytest.mark.parametrize("latest", ["missing", "garbled", "stale"])
def test_latest_is_not_needed(metrics, ref, latest):
    stopped(ref, 3)
    p = Path(ref.out) / "checkpoints" / "latest"
    if latest == "missing":
        p.unlink()
    else:
        p.write_text("\x00garbage" if latest == "garbled" else "step-00000001.safetensors\n")
    train(ref)
    same_weights(ref.out, ref.ref_out)
    assert [m["step"] for m in metrics(ref.out)] == [m["step"] for m in metrics(ref.ref_out)]


# ---- 4. a damaged newest checkpoint: the previous intact one, with a warning naming the file


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(ref, capsys, damage):
    stopped(ref, 3)
    bad = next((Path(ref.out) / "checkpoints").glob("step-00000003.*"))
    data = bad.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "bit flip":
        bad.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    else:
        bad.write_bytes(b"")
    train(ref)
    err = capsys.readouterr().err
    assert f"skipping a damaged checkpoint: {bad}" in err and "resuming from" in err and "step-00000002." in err
    same_weights(ref.out, ref.ref_out)


def test_a_damaged_checkpoint_without_manifest_is_caught_by_its_own_checksum(ref, capsys):
    stopped(ref, 3)
    (Path(ref.out) / "ssa-run.json").unlink()
    bad = Path(ref.out) / "checkpoints" / "step-00000003.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    from selective_attention.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="do not match their checksum"):
        read_checkpoint(bad)
    train(ref)
    assert "step-00000003.safetensors: its contents do not match" in capsys.readouterr().err
    same_weights(ref.out, ref.ref_out)


def test_no_intact_checkpoint_is_refused_naming_the_files(ref):
    stopped(ref, 2)
    for p in (Path(ref.out) / "checkpoints").glob("step-*"):
        p.write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"no intact checkpoint.*step-00000002\.safetensors.*--overwrite"):
        train(ref)
    assert (Path(ref.out) / "checkpoints" / "step-00000002.safetensors").read_bytes() == b"garbage"


# ---- 5. one run per directory


def test_a_second_run_into_the_same_directory_is_refused(cli_args, cfg, capsys):
    from selective_attention.train.lock import RunLock

    out = Path(cfg.out)
    out.mkdir(parents=True)
    lock = RunLock(out.resolve()).acquire()
    try:
        assert main(cli_args(cfg)) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err == f"ssa train: error: --out {out.resolve()} is in use by another ssa train run (PID "
            f"{os.getpid()}): wait for it to finish or choose another directory"
        )
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        lock.release()


def test_the_lock_of_a_killed_run_is_released(cfg, tmp_path):
    out = Path(cfg.out)
    out.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True)\n"
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="PID 4242"):
            train(cfg)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert math.isfinite(train(cfg)["final_val_loss"])


# ---- 6. --overwrite removes only what a run wrote


def test_overwrite_refuses_files_it_did_not_write(ref, capsys):
    stopped(ref, 2)
    out = Path(ref.out)
    (out / "notes.txt").write_text("mine")
    before = ckpts(out)
    assert main(_cli_same(TrainConfig(**{**ref.to_dict(), "lr": 0.01, "overwrite": True}))) == 2
    err = capsys.readouterr().err
    assert "did not write (notes.txt)" in err and "\n" not in err.strip()
    assert ckpts(out) == before and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    (out / "final").mkdir()
    (out / "final" / "mine.bin").write_bytes(b"x")  # final/ of a manifest run: only its listed files are ours
    with pytest.raises(UserError, match=r"did not write \(final/mine\.bin\)"):
        train(TrainConfig(**{**ref.to_dict(), "lr": 0.01, "overwrite": True}))
    (out / "final" / "mine.bin").unlink()
    other = train(TrainConfig(**{**ref.to_dict(), "lr": 0.01, "overwrite": True}))
    assert other["config"]["lr"] == 0.01 and ckpts(out) == ["step-00000003.safetensors", "step-00000004.safetensors"]


def test_overwrite_refuses_a_directory_that_is_not_a_run(cfg):
    out = Path(cfg.out)
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("mine\n")  # one of our names, but no run of ours
    with pytest.raises(UserError, match="holds no run of ours"):
        train(TrainConfig(**{**cfg.to_dict(), "overwrite": True}))
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


# ---- 7. clear errors, settings that cannot fit, disk full, temporary files, umask, --stop-at-step


@pytest.mark.parametrize("case", ["warmup", "step larger than the data", "memory"])
def test_settings_that_cannot_fit_are_refused(cfg, monkeypatch, case):
    if case == "warmup":
        cfg.warmup, match = 10, r"--warmup 10 is longer than the run \(4 optimizer steps"
    elif case == "step larger than the data":
        cfg.seq_len, cfg.batch_size, cfg.max_tokens = 200, 64, 12800
        match = "more than the whole train split"
    else:
        from selective_attention.train import limits

        monkeypatch.setattr(limits, "device_memory", lambda device: 1 << 16)
        match = r"--seq-len 32 with --batch-size 4 needs at least .* more than the 64.0 KB of cpu memory"
    with pytest.raises(UserError, match=match):
        train(cfg)
    assert not Path(cfg.out).exists()


def test_a_full_disk_names_the_path_and_the_space(ref, monkeypatch):
    from selective_attention.utils import files

    real = files.free_bytes
    monkeypatch.setattr(files, "free_bytes", lambda path: 1000)
    with pytest.raises(
        UserError,
        match=r"not enough disk space to write .*step-00000001\.safetensors: it needs "
        r"about [0-9.]+ MB, 1000 B free",
    ):
        train(ref)
    monkeypatch.setattr(files, "free_bytes", real)

    def full(path, state):  # the disk fills up in the middle of the write
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    from selective_attention.train import checkpoint

    monkeypatch.setattr(checkpoint, "write", full)
    with pytest.raises(UserError, match=r"write .*step-00000001\.safetensors: it needs about"):
        train(ref)
    assert list((Path(ref.out) / "checkpoints").iterdir()) == []  # no temporary file left


def test_orphan_temporary_files_are_cleaned(ref):
    stopped(ref, 2)
    out = Path(ref.out)
    orphans = [
        out / "checkpoints" / ".step-00000003.safetensors.abc123.tmp",
        out / "checkpoints" / ".step-00000003.pt.k9x.tmp",
        out / ".run.json.x1.tmp",
        out / ".ssa-run.json.y2.tmp",
        out / ".final.tmp" / "model.safetensors",
    ]
    for p in orphans:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half")
    (out / ".notes.txt.tmp").write_text("not ours")
    train(ref)
    assert not any(p.exists() for p in orphans) and not (out / ".final.tmp").exists()
    assert (out / ".notes.txt.tmp").read_text() == "not ours"
    same_weights(ref.out, ref.ref_out)


def test_files_follow_the_umask(cfg):
    old = os.umask(0o002)
    try:
        cfg.stop_at_step = None
        train(cfg)
    finally:
        os.umask(old)
    wrong = {
        str(p.relative_to(cfg.out)): oct(p.stat().st_mode & 0o777)
        for p in Path(cfg.out).rglob("*")
        if (p.stat().st_mode & 0o777) != (0o775 if p.is_dir() else 0o664)
    }
    assert not wrong


def test_stop_at_step_then_the_same_command_continues(ref, capsys):
    c = TrainConfig(**{**ref.to_dict(), "stop_at_step": 2})
    assert main(_cli_same(c)) == 0
    assert "stopped after step 2 of 4: run the same command again to continue" in capsys.readouterr().err
    assert main(_cli_same(c)) == 0  # the same command, --stop-at-step 2 included
    assert (Path(ref.out) / "run.json").is_file()
    same_weights(ref.out, ref.ref_out)


def test_a_resumed_run_says_from_which_step(ref, capsys):
    stopped(ref, 2)
    capsys.readouterr()
    assert main(_cli_same(ref)) == 0
    assert f"{Path(ref.out).resolve()}: resuming from step 2 of 4" in capsys.readouterr().err
    same_weights(ref.out, ref.ref_out)


def test_ctrl_c_says_how_to_resume_and_the_same_command_does(ref, capsys, monkeypatch):
    from selective_attention.train import trainer

    real_step = trainer.train_step

    def interrupted_at_step_2(*args, step, **kw):  # Ctrl-C during the third step (after checkpoint 2)
        if step == 2:
            raise KeyboardInterrupt
        return real_step(*args, step=step, **kw)

    monkeypatch.setattr(trainer, "train_step", interrupted_at_step_2)
    assert main(_cli_same(ref)) == 130
    err = capsys.readouterr().err
    assert (
        "ssa train: interrupted: run the same command again to resume from the last checkpoint (if one was written)"
        in err.splitlines()
    ) and "Traceback" not in err
    assert ckpts(ref.out) == ["step-00000001.safetensors", "step-00000002.safetensors"]
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert main(_cli_same(ref)) == 0  # the same command
    assert "resuming from step 2 of 4" in capsys.readouterr().err
    same_weights(ref.out, ref.ref_out)


@pytest.mark.slow
def test_a_failing_process_of_nproc_2_is_one_line(cli_args, cfg, capsys):
    """The processes fail in setup (a window longer than the train split): one line, the child's exit code."""
    code = main(
        cli_args(
            cfg, "--nproc", "2", "--seq-len", "100000", "--max-tokens", "200000", "--batch-size", "1", "--warmup", "1"
        )
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith("ssa train: error: the train split has") and err.endswith("exited with code 2)")
    assert not Path(cfg.out).exists()


# ---- 8. --temperatures-only


def test_temperatures_only_trains_only_the_temperatures(weights, cfg, tmp_path):
    runs = []
    for lr in (1e-3, 3e-3):
        c = TrainConfig(
            **{
                **cfg.to_dict(),
                "attention": "ssa",
                "temperatures_only": True,
                "lr": lr,
                "out": str(tmp_path / f"lr{lr}"),
                "checkpoint_every": 4,
            }
        )
        assert train(c)["config"]["temperatures_only"] is True
        state = read_checkpoint(tmp_path / f"lr{lr}" / "checkpoints" / "step-00000004.safetensors")
        assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["temperature"]
        runs.append(weights(c.out))
    temps = [k for k in runs[0] if "temperature" in k]
    assert temps and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0] if k not in temps)  # frozen
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in temps)  # trained (at their lr)
    with pytest.raises(UserError, match="--temperatures-only .* --attention vanilla has none"):
        train(TrainConfig(**{**cfg.to_dict(), "temperatures_only": True}))
    from selective_attention.cli.train import SWITCHES

    assert ("temperatures-only", "temperatures_only") in [(a, b) for a, b, _ in SWITCHES]


# ---- fault injection: SIGKILL at random moments


def _cmd(out: Path, c: TrainConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "selective_attention",
        "train",
        "--data",
        c.data,
        "--size",
        "tiny",
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-tokens",
        str(8 * 128),
        "--eval-every",
        "2",
        "--eval-tokens",
        "128",
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "2",
        "--log-every",
        "1",
        "--warmup",
        "1",
        "--cache-dir",
        c.cache_dir,
        "--out",
        str(out),
        "--no-progress",
    ]


def _newest_intact_step(out: Path) -> int:
    from selective_attention.train import rundir

    manifest, _ = rundir.read_manifest(out)
    path, _, _ = rundir.newest_intact(out, manifest, report=False)
    return int(path.name[5:13]) if path else 0


@pytest.mark.slow
def test_sigkill_at_random_moments(cfg, tmp_path):
    """Kill a real `ssa train` (8 steps, a checkpoint every step) with SIGKILL at random moments, several times
    per seed; every rerun resumes to the uninterrupted weights or refuses in one line, the newest intact checkpoint
    never goes back, and no result is ever NaN."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    ref = subprocess.run(_cmd(tmp_path / "ref", cfg), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    duration = time.perf_counter() - t0
    expected = json.loads((tmp_path / "ref" / "run.json").read_text())["final_val_loss"]
    deadline = time.perf_counter() + 120
    kills, refusals, seeds = 0, 0, 0
    for seed in range(6):
        if time.perf_counter() > deadline:
            break
        rng, seeds = random.Random(seed), seeds + 1
        out = tmp_path / f"s{seed}"
        best = 0
        for _ in range(4):
            proc = subprocess.Popen(_cmd(out, cfg), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                proc.wait(timeout=rng.uniform(0.3, 1.1) * duration)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            _, err = proc.communicate()
            if proc.returncode not in (0, -signal.SIGKILL):
                lines = [line for line in err.splitlines() if line.startswith("ssa train: error:")]
                assert lines and "Traceback" not in err, err  # refused: a clear message
                refusals += 1
            if out.is_dir():
                step = _newest_intact_step(out)
                assert step >= best, f"seed {seed}: the newest intact checkpoint went back from {best} to {step}"
                best = step
            if (out / "run.json").is_file():
                assert math.isfinite(json.loads((out / "run.json").read_text())["final_val_loss"])
        final = subprocess.run(_cmd(out, cfg), env=env, capture_output=True, text=True)
        assert final.returncode == 0, final.stderr
        result = json.loads((out / "run.json").read_text())
        assert result["final_val_loss"] == expected and "nan" not in final.stdout
        same_weights(out, tmp_path / "ref")
    print(f"{kills} kills, {refusals} refusals over {seeds} seeds (a run takes {duration:.1f} s)")
    assert kills >= 6
