"""Scale-out helpers: process groups (gloo on CPU, NCCL on GPU), DDP / FSDP wrapping, full state dicts for
checkpoints, and ``ssa train --nproc N`` which re-launches itself under ``torchrun``.

A single process (no ``WORLD_SIZE`` in the environment) runs with no process group at all, so every helper
here is also a no-op path for the laptop case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from selective_attention.errors import UserError
from selective_attention.utils.device import choose_device

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto", fsdp: bool = False) -> DistInfo:
    """Join the process group that ``torchrun`` set up through the environment (if any) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = choose_device(device).type == "cuda"
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")  # one GPU per process: the local rank's
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, fsdp=fsdp and world > 1)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def main_first(fn: Callable[[], T], info: DistInfo) -> T:
    """Run ``fn`` on rank 0 first (it fills caches), then on the others; a UserError on rank 0 is raised on
    every rank (no rank is left waiting at a barrier)."""
    if not info.distributed:
        return fn()
    err: list[Any] = [None]
    result = None
    if info.is_main:
        try:
            result = fn()
        except UserError as e:
            err[0] = str(e)
    dist.broadcast_object_list(err, src=0)
    if err[0] is not None:
        raise UserError(err[0])
    if not info.is_main:
        result = fn()
    return result  # type: ignore[return-value]


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP (or FSDP2 ``fully_shard`` per transformer block, then the root) across the process group."""
    if not info.distributed:
        return model
    if info.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        block_names = set(getattr(model, "_no_split_modules", None) or [])
        for m in model.modules():
            if type(m).__name__ in block_names:
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


def no_sync(model: nn.Module, info: DistInfo, sync: bool):
    """Context for one micro-batch: skip the gradient all-reduce unless ``sync`` (the last micro-batch)."""
    if not info.distributed or sync:
        if info.fsdp:
            cast("FSDPModule", model).set_requires_gradient_sync(True)
        return nullcontext()
    if info.fsdp:
        cast("FSDPModule", model).set_requires_gradient_sync(False)
        return nullcontext()
    return cast("DistributedDataParallel", model).no_sync()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (collective under FSDP; CPU copies)."""
    if info.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict(), optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    if info.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


ENV_ERRORS = "SSA_TRAIN_ERRORS"  # a folder where each process of a launched run writes its one-line error
# torchrun without its ChildFailedError traceback: the exit code of the first failed process, and no log lines.
# It stops with the `ssa train` that started it and its processes stop with it (utils.parent): when `ssa train` is
# killed, torchrun gets SIGTERM and ends its processes (which also get SIGTERM if torchrun itself is SIGKILLed).
TORCHRUN = """
import logging, os, sys
from selective_attention.utils import parent
parent.follow_env()
os.environ[parent.ENV_PARENT] = str(os.getpid())
from torch.distributed import run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
try:
    run.run(run.parse_args(sys.argv[1:]))
except ChildFailedError as e:
    codes = [f.exitcode for _, f in sorted(e.failures.items())]
    sys.exit(next((c for c in codes if c > 0), 1))
except SignalException as e:  # stopped by a signal (its parent died, or a kill): no traceback
    sys.exit(128 + int(e.sigval))
"""


def launch(nproc: int, config_file: str, out: Path | None = None) -> tuple[int, list[tuple[int, str]]]:
    """Re-run ``ssa train --config FILE`` under torchrun (standalone, ``nproc`` processes); returns its exit code
    and the one-line errors of the processes that failed, as (rank, message), rank 0 first. ``out``: the run
    directory whose lock this process holds for its children."""
    from selective_attention.train.lock import ENV_HELD
    from selective_attention.utils.parent import ENV_PARENT

    cmd = [
        sys.executable,
        "-c",
        TORCHRUN,
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "selective_attention",
        "train",
        "--config",
        config_file,
    ]
    env = dict(os.environ)
    env["SSA_LAUNCHED"] = "1"  # the parent prints the summary, not rank 0 as well
    env[ENV_PARENT] = str(os.getpid())  # torchrun, and through it the processes, stop when this process dies
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if out is not None:
        env[ENV_HELD] = str(out)
    with tempfile.TemporaryDirectory(prefix="ssa-errors-") as errors:
        env[ENV_ERRORS] = errors
        code = subprocess.call(cmd, env=env)
        found = []
        for f in Path(errors).glob("rank-*.txt"):
            msg = f.read_text(encoding="utf-8").strip()
            if msg:
                found.append((int(f.stem.split("-")[1]), msg))
    return code, sorted(found)


def report_error(message: str) -> bool:
    """In a process of a launched run: leave ``message`` for the parent (which prints it once); False outside."""
    folder = os.environ.get(ENV_ERRORS)
    if not folder or not Path(folder).is_dir():
        return False
    (Path(folder) / f"rank-{os.environ.get('RANK', '0')}.txt").write_text(message.replace("\n", " "), encoding="utf-8")
    return True
