"""Checkpoint files that hold data, never code.

A checkpoint is one safetensors file: every tensor of the state (model, optimizer moments and step counters,
RNG states) as a tensor, and the rest (step, optimizer scalars and param-group structure, numpy / Python RNG
states, the config) as JSON in the header's metadata, with the sha256 of the tensor contents so that a file is
verifiable on its own (OUT/ssa-run.json also records the file's size and sha256). Loading parses JSON and raw
tensor bytes: nothing in a run directory is ever unpickled.

Older checkpoints (``step-*.pt``, format 1, torch.save pickles) are read with ``torch.load(weights_only=True)``
and an allow-list of the numpy types their RNG state needs; anything else in them is refused, naming the file.

``rng_state`` / ``set_rng_state``: the RNG state a checkpoint carries (torch, CUDA, numpy, Python), so that a
resumed run draws the same numbers as one that was never stopped.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selective_attention.errors import first_line
from selective_attention.utils.files import fsync_file, sha256_file

FORMAT = "ssa-checkpoint"
VERSION = 2  # 1: torch.save pickles (step-*.pt)
SUFFIX = ".safetensors"


class CheckpointError(Exception):
    """A checkpoint file that cannot be read or fails its checksum; the message names the file."""


# ---- (de)serialisation of a nested state: tensors apart, the rest as JSON


def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[tuple, str], key: str) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.numel():
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in seen:  # tied weights (embeddings = lm_head): stored once
                return {"__tensor__": seen[view]}
            if any(v[0] == view[0] for v in seen):  # another view of a stored storage: a copy of its own
                t = t.clone()
            seen[view] = key
        tensors[key] = t.contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, seen, f"{key}/{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, seen, f"{key}/#k{i}"), _encode(v, tensors, seen, f"{key}/{i}")]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, seen, f"{key}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen, f"{key}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__} at {key}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def nbytes(state: dict[str, Any]) -> int:
    """About the size of the checkpoint of ``state`` (its tensor bytes)."""
    total = 0

    def walk(o: Any) -> None:
        nonlocal total
        if isinstance(o, torch.Tensor):
            total += o.numel() * o.element_size()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(state)
    return total


def write(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` (a new file, not atomic by itself: the caller writes to a temporary name)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = _encode(state, tensors, {}, "s")
    save_file(
        tensors,
        str(path),
        metadata={
            "format": FORMAT,
            "version": str(VERSION),
            "state": json.dumps(meta),
            "content_sha256": content_sha256(tensors),
        },
    )
    fsync_file(path)


def read(path: str | os.PathLike, expect: dict[str, Any] | None = None, verify: bool = True) -> dict[str, Any]:
    """The state saved in ``path``. ``expect``: its {"size", "sha256"} from the run manifest (checked first);
    ``verify``: check the contents' own sha256. CheckpointError (naming the file) when it fails."""
    path = Path(path)
    if path.suffix == ".pt":
        return _read_legacy(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if expect:
        size = path.stat().st_size
        if expect.get("size") is not None and size != expect["size"]:
            raise CheckpointError(
                f"{path}: {size} bytes, the run manifest recorded {expect['size']} (truncated or overwritten)"
            )
        if expect.get("sha256") and sha256_file(path) != expect["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the one recorded when it was written (corrupt)")
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a checkpoint of ssa train (no {FORMAT} header)")
        if int(meta.get("version", 0)) > VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format {meta['version']} is newer than this version reads "
                f"({VERSION}): update selective-attention"
            )
        tensors = load_file(str(path))
        if verify and content_sha256(tensors) != meta.get("content_sha256"):
            raise CheckpointError(f"{path}: its contents do not match their checksum (corrupt)")
        return _decode(json.loads(meta["state"]), tensors)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors: truncated / garbled header; json: garbled metadata
        msg = first_line(e) or type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg})") from None


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """Only the ``config`` of a checkpoint (its header; no tensor is read)."""
    path = Path(path)
    if path.suffix == ".pt":
        return _read_legacy(path)["config"]
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["state"])["config"]
    except Exception as e:
        msg = first_line(e) or type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg})") from None


def _legacy_allowed() -> list[Any]:
    """What a format-1 checkpoint holds besides tensors and containers: numpy's RNG state (an ndarray)."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _read_legacy(path: Path) -> dict[str, Any]:
    """A format-1 ``step-*.pt`` through torch's weights-only unpickler (it refuses any other global)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        with torch.serialization.safe_globals(_legacy_allowed()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "Unsupported global" in text or "weights_only" in text.lower() or "Weights only" in text:
            what = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
            what = what.split("Unsupported global:", 1)[-1].split(" was not", 1)[0].strip() if what else "an object"
            raise CheckpointError(
                f"{path}: refused, it holds more than tensors and plain values ({what}); "
                "checkpoints are never unpickled"
            ) from None
        msg = first_line(e) or type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {msg})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "config"} <= set(state):
        raise CheckpointError(f"{path}: not a checkpoint of ssa train")
    return state


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """{"size", "sha256"} of a written file (for the run manifest)."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


# ---- the RNG state a checkpoint carries


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
