"""Children never outlive their parent, and a run lock cannot be held twice: SIGKILL of `ssa experiment lm
--jobs 2` and of `ssa train --nproc 2` mid-run ends every process they started within seconds, frees the run
locks, and the same command run again resumes every unfinished run from its checkpoint and finishes; a lock file
removed by its holder between another process's open and flock is not locked again beside a new one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from selective_attention.experiments import lm
from selective_attention.train import TrainConfig, rundir, train
from selective_attention.train import lock as lock_mod
from selective_attention.train.lock import RunInUse, RunLock
from selective_attention.utils import parent

SRC = Path(__file__).resolve().parents[1] / "src"
GONE_WITHIN_S = 5.0  # "promptly": SIGTERM from the kernel (PR_SET_PDEATHSIG) takes milliseconds


# ---- the lock


@pytest.mark.parametrize("how", ["discard", "abandon"])
def test_a_lock_file_removed_by_its_holder_is_never_locked_beside_a_new_one(tmp_path, monkeypatch, how):
    """A holds OUT/.lock; B opens that file; A gives the run up (removes the file, then releases it); only then
    does B flock the file it opened; C then creates a new OUT/.lock and locks it. B must not hold the removed
    file: one of B and C holds the run, the other is refused. The interleaving is forced: B's flock runs A's
    give-up first."""
    out = tmp_path / "run"
    out.mkdir()
    a = RunLock(out).acquire()
    plan = rundir.Plan("fresh", out, lock=a, created=out)  # a run that created OUT and wrote nothing but its lock
    give_up = a.discard if how == "discard" else plan.abandon
    real = lock_mod.fcntl.flock
    calls: list[int] = []

    def flock(fd: int, op: int) -> None:
        if not calls:  # B, between its open and its flock
            give_up()
        calls.append(fd)
        real(fd, op)

    fake = SimpleNamespace(flock=flock, LOCK_EX=lock_mod.fcntl.LOCK_EX, LOCK_NB=lock_mod.fcntl.LOCK_NB)
    monkeypatch.setattr(lock_mod, "fcntl", fake)
    b = RunLock(out).acquire()
    monkeypatch.undo()
    holders = [b]
    try:
        try:
            holders.append(RunLock(out).acquire())  # C
        except RunInUse:
            pass
        assert len(holders) == 1, "two processes hold the same run directory"
        # and B's lock is the file at the path, which names B
        assert (os.fstat(b.fd).st_ino, os.fstat(b.fd).st_dev) == (os.stat(b.path).st_ino, os.stat(b.path).st_dev)
        assert (out / ".lock").read_text().strip() == str(os.getpid())
    finally:
        for h in holders:
            h.release()


# ---- the parent check of the training loop (where there is no PR_SET_PDEATHSIG)


def test_a_run_whose_parent_is_gone_stops_before_its_next_step_and_resumes_exactly(cfg, weights, tmp_path, monkeypatch):
    cfg.checkpoint_every = 1
    checks = iter([False, False, True])  # the parent dies during step 2
    monkeypatch.setattr(parent, "gone", lambda: next(checks, True))
    with pytest.raises(parent.ParentGone) as stopped:
        train(cfg)
    assert stopped.value.code == parent.STOPPED == 143
    assert _checkpoint_steps(Path(cfg.out)) == [1, 2] and not (Path(cfg.out) / "run.json").is_file()
    monkeypatch.undo()
    assert train(cfg)["steps"] == 4
    train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "full")}))
    resumed, ref = weights(cfg.out), weights(tmp_path / "full")
    assert all(resumed[k].equal(ref[k]) for k in ref)  # bit-identical to the uninterrupted run


def test_follow_is_false_when_the_parent_is_gone_already(monkeypatch):
    monkeypatch.setattr(parent, "_parent", None)
    monkeypatch.setattr(parent, "_die_with_parent", lambda: None)  # not for pytest itself
    assert not parent.gone()  # a process that follows nothing never stops for it
    assert parent.follow(os.getppid()) and not parent.gone()
    assert not parent.follow(os.getpid())  # not our parent: as if it had died and we were adopted
    monkeypatch.setenv(parent.ENV_PARENT, str(os.getpid()))
    with pytest.raises(parent.ParentGone):
        parent.follow_env()
    assert parent.ENV_PARENT not in os.environ  # not handed down to this process's own children


# ---- SIGKILL of the parent


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # an orphan's zombie is dead already
    except psutil.NoSuchProcess:
        return False


def _wait(what: str, ready: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"exited (code {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.perf_counter() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        time.sleep(0.05)


def _kill_parent(proc: subprocess.Popen, expect: int) -> tuple[list[psutil.Process], float]:
    """SIGKILL ``proc`` (which started ``expect`` or more processes) and wait for every process it had started,
    at any depth; returns them and how long the last one took to die."""
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= expect, children
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.perf_counter()
    while any(_alive(c) for c in children):
        if time.perf_counter() - t0 > GONE_WITHIN_S:
            alive = [(c.pid, c.cmdline()[-3:]) for c in children if _alive(c)]
            raise AssertionError(f"still running {GONE_WITHIN_S} s after their parent's SIGKILL: {alive}")
        time.sleep(0.01)
    return children, time.perf_counter() - t0


def _end(procs: list[psutil.Process]) -> None:
    """Test cleanup: kill what this test started and is still running (a failed test leaves no orphans)."""
    for p in procs:
        if _alive(p):
            p.kill()


def _checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in (out / "checkpoints").glob("step-*.safetensors"))


def _logged_until(out: Path, step: int) -> list[dict]:
    return [rec for rec in rundir.read_metrics(out / "metrics.jsonl") if rec["step"] <= step]


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "OMP_NUM_THREADS": "1",
        "SSA_CACHE_DIR": str(tmp_path.parent / "ssa-cache"),
    }


def _resumed(out: Path, kept: list[dict]) -> None:
    """The rerun resumed ``out`` from its checkpoint: the metric lines logged up to it are the same records (a
    run started again would log new timings), and it finished."""
    assert (out / "run.json").is_file()
    assert _logged_until(out, kept[-1]["step"]) == kept


def test_sigkill_of_a_study_with_two_workers(corpus, tmp_path):
    """`ssa experiment lm --jobs 2` killed with SIGKILL while both workers train: the workers (and
    multiprocessing's resource tracker) are gone within seconds, their run locks are free, and the same command
    resumes both runs and finishes the study."""
    out = tmp_path / "study"
    sets = {
        "corpora": corpus,
        "length_corpus": corpus,
        "methods": "vanilla,ssa",
        "seq_len": 32,
        "vocab_size": 300,
        "batch_size": 4,
        "max_tokens": 128 * 100,  # long enough that neither run can finish before the other checkpoints
        "eval_every": 20,
        "eval_tokens": 256,
        "checkpoint_every": 2,
        "length_multipliers": 1,
        "length_windows": 1,
        "entropy_windows": 1,
        "passkey_trials": 0,
    }
    overrides = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    cmd = [
        sys.executable,
        "-m",
        "selective_attention",
        "experiment",
        "lm",
        "--budget",
        "quick",
        "--seeds",
        "1",
        "--jobs",
        "2",
        "--out",
        str(out),
        "--no-progress",
        *overrides,
    ]
    runs = [r.path for r in lm.plan(out, lm.Config(corpora=(str(corpus),), methods=("vanilla", "ssa")), [0])]
    assert len(runs) == 2
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children: list[psutil.Process] = []
    try:
        _wait(
            "training both runs",
            lambda: all((r / "checkpoints").is_dir() and _checkpoint_steps(r) for r in runs),
            proc,
            120,
        )
        children, took = _kill_parent(proc, expect=2)
        print(f"{len(children)} processes gone {took * 1000:.0f} ms after the study's SIGKILL")
        kept = {}
        for r in runs:
            assert not (r / "run.json").is_file()  # killed mid-run
            RunLock(r).acquire().release()  # no orphan holds the run
            kept[r] = _logged_until(r, _checkpoint_steps(r)[-1])
        again = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert json.loads((out / "results.json").read_text())["complete"]
        for r in runs:
            _resumed(r, kept[r])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _end(children)


def test_sigkill_of_train_with_two_processes(corpus, tmp_path):
    """`ssa train --nproc 2` killed with SIGKILL mid-run: torchrun and both processes are gone within seconds,
    the run's lock is free, and the same command resumes from the checkpoint and finishes."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "selective_attention",
        "train",
        "--data",
        str(corpus),
        "--size",
        "tiny",
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--max-tokens",
        str(128 * 40),
        "--eval-every",
        "0",
        "--eval-tokens",
        "128",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "1",
        "--log-every",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
        "--no-progress",
        "--nproc",
        "2",
    ]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    children: list[psutil.Process] = []
    try:
        _wait("training", lambda: (out / "checkpoints").is_dir() and bool(_checkpoint_steps(out)), proc, 120)
        children, took = _kill_parent(proc, expect=3)  # torchrun and its 2 processes
        print(f"{len(children)} processes gone {took * 1000:.0f} ms after the launcher's SIGKILL")
        assert not (out / "run.json").is_file()
        RunLock(out).acquire().release()
        kept = _logged_until(out, _checkpoint_steps(out)[-1])
        again = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        assert json.loads((out / "run.json").read_text())["steps"] == 40
        _resumed(out, kept)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _end(children)
