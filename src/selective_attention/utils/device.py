"""One rule for picking the torch device from a ``--device`` option."""

from __future__ import annotations

import torch

from selective_attention.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def choose_device(name: str | None = "auto") -> torch.device:
    """ "auto" (or None): cuda when available, else cpu; "cpu"; "cuda" or "cuda:N" (UserError without CUDA)."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available here (use cpu or auto)")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise UserError(f"--device {name}: use auto, cpu or cuda")
