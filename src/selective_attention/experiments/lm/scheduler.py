"""Training a study's plan: one run at a time in this process, or ``jobs`` worker processes that each take every
run no other process holds (each run directory is locked by its trainer), then a pass here that finishes what they
left and raises their errors. A ``Study`` says what its runs are, how each trains and how it is evaluated: the LM
study (``LMStudy``) and the fine-tuning study share this scheduler."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from selective_attention.errors import UserError
from selective_attention.experiments import common
from selective_attention.experiments.lm.config import Config
from selective_attention.experiments.lm.evaluation import evaluate_run, is_evaluated
from selective_attention.experiments.lm.runs import Run, is_trained, plan, train_config

if TYPE_CHECKING:
    from selective_attention.train import TrainConfig


class Study(Protocol):
    """A study's runs for the scheduler; picklable (the worker processes are spawned with it)."""

    @property
    def name(self) -> str: ...  # in progress bars and log lines ("lm study")

    @property
    def budget(self) -> str: ...

    def plan(self) -> list[Run]: ...

    def train_config(self, study_run: Run, progress: bool) -> TrainConfig: ...

    def evaluate(self, study_run: Run) -> None: ...

    def is_evaluated(self, study_run: Run) -> bool: ...  # evaluated with the study's settings: nothing left to train


@dataclass(frozen=True)
class StudyPlan:
    """What every ``Study`` is made of: its output folder, its Config (which names the budget) and its seeds."""

    out: Path
    config: Any
    seeds: tuple[int, ...]

    @property
    def budget(self) -> str:
        return str(self.config.budget)


@dataclass(frozen=True)
class LMStudy(StudyPlan):
    config: Config
    name = "lm study"

    def plan(self) -> list[Run]:
        return plan(self.out, self.config, list(self.seeds))

    def train_config(self, study_run: Run, progress: bool) -> TrainConfig:
        return train_config(study_run, self.config, progress=progress)

    def evaluate(self, study_run: Run) -> None:
        evaluate_run(study_run, self.config)

    def is_evaluated(self, study_run: Run) -> bool:
        return is_evaluated(study_run, self.config)


def train_and_evaluate(study_run: Run, study: Study, progress: bool, skip_busy: bool) -> str:
    """Train (or resume) one run and evaluate it: "done", "stopped" (stop_at_step) or "busy" (``skip_busy``: another
    process holds the run, so leave it to that process)."""
    from selective_attention.train import train
    from selective_attention.train.lock import RunInUse, RunLock

    try:
        # an evaluated run needs no model: its records alone (restored from results/) count as finished
        if not is_trained(study_run) and not study.is_evaluated(study_run):
            info = train(study.train_config(study_run, progress=progress))
            if "stopped_at_step" in info:  # stopped on purpose (stop_at_step): the next invocation resumes it
                return "stopped"
        lock = RunLock(study_run.path).acquire()  # the evaluation writes into the run directory too
    except RunInUse:
        if skip_busy:
            return "busy"
        raise
    try:
        study.evaluate(study_run)
    finally:
        lock.release()
    return "done"


def _worker(study: Study, threads: int, parent: int) -> None:
    """One of ``jobs`` processes: walk the plan, take every run no other process holds. It stops with the study
    (``utils.parent``): an orphan would go on training while holding its run's lock. (A module-level function: the
    spawned process imports it by this module's name.)"""
    import sys

    from selective_attention.utils import parent as parent_process

    if not parent_process.follow(parent):  # the study died while this process was starting
        return
    import torch

    torch.set_num_threads(threads)

    def say(r: Run, what: str) -> None:
        print(
            f"{study.name} [worker {os.getpid()}]: {r.corpus}/{r.method}-seed{r.seed} {what}",
            file=sys.stderr,
            flush=True,
        )

    for r in study.plan():
        if parent_process.gone():  # the study was stopped: do not start another run
            return
        try:
            state = train_and_evaluate(r, study, progress=False, skip_busy=True)
        except UserError as e:  # the parent's pass runs it again and reports the error
            say(r, f"failed: {e}")
            return
        except KeyboardInterrupt:  # Ctrl-C reaches every process of the group: stop quietly, the parent reports
            return
        if state == "stopped":
            return
        if state == "done":
            say(r, "done")


def train_all(study: Study, progress: bool, jobs: int) -> None:
    """Train and evaluate every run of the study's plan; ``jobs`` > 1 first lets that many worker processes share
    it, each with its share of the CPU threads (small models train faster as several single-threaded processes than
    as one multi-threaded one)."""
    if jobs > 1:
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // jobs)
        ctx = multiprocessing.get_context("spawn")
        workers = [ctx.Process(target=_worker, args=(study, threads, os.getpid()), daemon=True) for _ in range(jobs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    # one pass in this process: everything when jobs == 1, otherwise what the workers left (it raises their errors)
    runs = study.plan()
    bar = common.progress(len(runs), f"{study.name} ({study.budget})", progress)
    for r in runs:
        bar.set_postfix_str(f"{r.corpus}/{r.method} seed {r.seed}")
        if train_and_evaluate(r, study, progress=False, skip_busy=False) == "stopped":
            break
        bar.update(1)
    bar.close()
