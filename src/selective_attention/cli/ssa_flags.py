"""The SSA flags that ``ssa train`` and ``ssa convert`` share: one flag per SSAConfig field, built from its fields."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from selective_attention.config import SSAConfig

# field -> (flag, help); booleans become --flag / --no-flag, the rest take a value. Fields not listed here
# (mlp_growth, position_scale) are not exposed on the command line.
SSA_FLAGS: dict[str, tuple[str, str]] = {
    "query": ("query", "query temperature (default on)"),
    "value": ("value", "value temperature (default on)"),
    "key": ("key", "key temperature (ablation; default off)"),
    "token_aware": ("token", "token-aware term tanh(f(x)) (default on)"),
    "position_aware": ("position", "position-aware term c log p (default on)"),
    "value_position_aware": ("value-position", "the c log p term on the value temperature too (default off)"),
    "sharing": ("sharing", "token term: shared (read-out on the layer's own projection; default) or mlp"),
    "init": ("ssa-init", "identity (the vanilla function at step 0) or scratch (c = 0.5)"),
    "position_init": ("position-init", "the position coefficient c at the start (wins over --ssa-init's c)"),
    "mlp_hidden": ("mlp-hidden", "hidden width of the mlp token term (default: ~5%% model growth)"),
}
_CHOICES = {"sharing": ("shared", "mlp"), "init": ("identity", "scratch")}


def add_ssa_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    prefix: str = "ssa_",
    help_overrides: dict[str, str] | None = None,
) -> None:
    """Add one flag per SSAConfig field in ``SSA_FLAGS`` (dest ``prefix + field``, default None = not given),
    so that ``ssa_config_from_args`` can tell a given flag from a default."""
    help_overrides = help_overrides or {}
    types = {f.name: f.type for f in dataclasses.fields(SSAConfig)}
    for name, (flag, help_text) in SSA_FLAGS.items():
        kw: dict[str, Any] = {"dest": prefix + name, "default": None, "help": help_overrides.get(name, help_text)}
        if types[name] in ("bool", bool):
            parser.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, **kw)
        elif name in _CHOICES:
            parser.add_argument(f"--{flag}", choices=_CHOICES[name], **kw)
        elif name == "position_init":
            parser.add_argument(f"--{flag}", type=float, metavar="C", **kw)
        else:
            parser.add_argument(f"--{flag}", type=int, metavar="N", **kw)


def ssa_args_given(args: argparse.Namespace, prefix: str = "ssa_") -> dict[str, Any]:
    """The SSAConfig fields given on the command line, {field: value}."""
    return {name: getattr(args, prefix + name) for name in SSA_FLAGS if getattr(args, prefix + name, None) is not None}


def ssa_config_from_args(
    args: argparse.Namespace, *, prefix: str = "ssa_", base: SSAConfig | None = None, **overrides: Any
) -> SSAConfig:
    """SSAConfig from ``base`` (default: SSAConfig()), then ``overrides``, then the flags that were given.
    An invalid combination raises ValueError (CLIs turn it into a UserError)."""
    d = (base or SSAConfig()).to_dict()
    d.update(overrides)
    d.update(ssa_args_given(args, prefix))
    return SSAConfig.from_dict(d)
