"""The one cache directory: ``$SSA_CACHE_DIR``, else ``~/.cache/selective_attention``.

Token arrays (``tokens/``) and converted lm-eval task data (``lm_eval_tasks/``) live below it. The old variable
``SSA_CACHE`` is no longer read: when it is set to anything but ``SSA_CACHE_DIR``'s value, this raises a one-line
UserError rather than silently using (and filling) a different folder than the one the user asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

from selective_attention.errors import UserError

ENV = "SSA_CACHE_DIR"
OLD_ENV = "SSA_CACHE"


def cache_dir(*parts: str) -> Path:
    """The cache root (or ``root/parts...``); not created here (writers create what they write)."""
    root = os.environ.get(ENV) or ""
    old = os.environ.get(OLD_ENV) or ""
    if old and Path(old).expanduser() != Path(root).expanduser():
        raise UserError(
            f"{OLD_ENV} is no longer read; the cache directory is set by {ENV}: export {ENV}={old} and unset {OLD_ENV}"
        )
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "selective_attention"
    return base.joinpath(*parts)
