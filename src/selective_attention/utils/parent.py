"""Child processes that never outlive their parent (the workers of ``ssa experiment lm --jobs N``, torchrun and
the processes of ``ssa train --nproc N``), however the parent dies, SIGKILL included.

A child calls ``follow(parent_pid)`` first thing: on Linux the kernel then sends it SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), which ends it at once (nothing here handles SIGTERM; the run resumes from its newest
checkpoint); elsewhere the training loop polls ``gone()`` every step. An orphan would keep training while a
rerun starts beside it, holding (study workers) or no longer covered by (``--nproc``) its run's lock.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

# set by a parent for the one child it starts (the `ssa train --nproc` launcher for torchrun, torchrun for its
# processes): the PID that child must follow; the child removes it so that its own children do not inherit it
ENV_PARENT = "SSA_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOPPED = 128 + int(signal.SIGTERM)  # the exit code of a child stopped because its parent died (as if SIGTERM'd)

_parent: int | None = None  # the PID this process follows (None: it follows nothing)


class ParentGone(SystemExit):
    """Raised where a child finds its parent gone: it stops without writing anything more."""

    def __init__(self) -> None:
        super().__init__(STOPPED)


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent (the thread that started it) exits. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the loop's gone() check still stops it
        pass


def follow(parent: int) -> bool:
    """From now on this process stops when ``parent`` (its parent process) dies. False when it died already
    (before this call: the kernel sends no signal then), and the caller should stop."""
    global _parent
    _parent = parent
    _die_with_parent()
    return not gone()  # checked after prctl: a parent that dies from here on is caught by the signal


def follow_env() -> None:
    """Follow the parent named by ``ENV_PARENT`` (and take it out of the environment); ParentGone if it died
    already. Nothing when the variable is not set (a process started by hand)."""
    pid = os.environ.pop(ENV_PARENT, None)
    if pid and not follow(int(pid)):
        raise ParentGone()


def gone() -> bool:
    """This process follows a parent that has died (a cheap check: one getppid())."""
    return _parent is not None and os.getppid() != _parent
