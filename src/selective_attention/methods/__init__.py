"""The registry of attention methods, chosen by name (``TrainConfig.attention``, ``ssa train --attention``): every
command trains, saves, reloads and evaluates them through it.

| method   | what changes in the attention                                                       | new parameters   |
|----------|-------------------------------------------------------------------------------------|------------------|
| vanilla  | nothing                                                                             | 0                |
| ssa      | SSA temperatures as ``TrainConfig.ssa`` says                                        | SSA's            |
| ssa-pos-head | SSA, position term on the query only: ``ssa`` with token_aware=False, value=False | 1 per head     |
| ssa-official | the official release's form: 1 + exp(-exp(beta)) ln p on q, one beta per layer    | 1 per layer      |
| const    | a learned constant tau_h per head on q (init 1)                                     | 1 per head       |
| yarn     | fixed 1 + coefficient * ln p on q (YaRN's 0.1 ln(s) + 1, s = visible context)        | 0                |
| ssmax    | Scalable-Softmax: s_h * ln p on q, s_h learned per head, init 1 / ln(seq_len)        | 1 per head       |
| freq     | fixed per-token rule on q: -ln f(t) / H from the train split's unigram frequencies   | 0                |
| llama4   | Llama 4 temperature tuning: 1 + beta * ln(1 + floor(p / floor_scale)) on q           | 0                |
| gated    | headwise sigmoid gate on the attention output before o_proj (Gated Attention, 2025)  | d_model * heads  |

``ssa-pos`` is the older name of ``ssa-pos-head`` (saved runs keep loading).

p is the 1-indexed absolute position. The query rules (const ... llama4) run through SSA's machinery: the model
is converted with a query-only, position-only SSAConfig and the query temperature function is replaced by the
rule (``attn.ssa_temperature.fns["query"]``), so every rule uses the same fused attention path.

Method options live in ``TrainConfig.method_options`` (JSON); ``Method.options`` lists each method's keys and
defaults. ``apply_method`` returns the new parameters (``Applied``) so that every method reports one
parameter count and puts its temperature parameters in the temperature optimizer group.

Saving and loading: ``ssa`` / ``ssa-pos-head`` models reload with ``selective_attention.from_pretrained``; the other
non-vanilla methods record ``config.ssa_method`` in config.json and reload with ``load_model`` here (the plain
loader would not know their modules).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError, first_line
from selective_attention.methods.gated import HeadGate, install_gates
from selective_attention.methods.rules import (
    ConstantTemperature,
    FrequencyTemperature,
    Llama4Temperature,
    OfficialPositionTemperature,
    ScalableSoftmaxTemperature,
    YarnTemperature,
    _StashInputIds,
    frequency_table,
)
from selective_attention.temperature import SSATemperatures, temperature_parameters
from selective_attention.utils.io import read_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel

METHOD_ATTR = "ssa_method"  # model.config.ssa_method = {"name": ..., "options": {...}} for the non-SSA methods
QUERY_CARRIER = SSAConfig(init="scratch", value=False, token_aware=False)  # hooks that carry a query rule

__all__ = [
    "METHODS",
    "ALIASES",
    "Applied",
    "Method",
    "MethodContext",
    "apply_method",
    "get_method",
    "load_model",
    "parameter_counts",
    "install_rule",
    "install_gates",
    "frequency_table",
    "HeadGate",
    "ConstantTemperature",
    "FrequencyTemperature",
    "Llama4Temperature",
    "OfficialPositionTemperature",
    "ScalableSoftmaxTemperature",
    "YarnTemperature",
]


RULES = ("const", "yarn", "ssmax", "freq", "llama4", "ssa-official")


def install_rule(
    model: nn.Module, rule: str, seq_len: int, freq_table: Tensor | None = None, options: dict[str, Any] | None = None
) -> list[nn.Module]:
    """Replace the query temperature of every SSA layer in a converted ``model`` by ``rule``. Returns the new
    modules (their parameters belong in the temperature optimizer group)."""
    opts = {**METHODS[rule].options_for(seq_len), **(options or {})} if rule in METHODS else {}
    new: list[nn.Module] = []
    for temps in [m for m in model.modules() if isinstance(m, SSATemperatures)]:
        H = cast(int, temps.fns["query"].n_heads)  # every query function (SSA's or a rule's) has n_heads
        if rule == "const":
            fn: nn.Module = ConstantTemperature(H)
        elif rule == "yarn":
            fn = YarnTemperature(H, opts["coefficient"])
        elif rule == "ssmax":
            fn = ScalableSoftmaxTemperature(H, seq_len, opts["s_init"])
        elif rule == "freq":
            if freq_table is None:
                raise ValueError("the freq rule needs a frequency table")
            fn = FrequencyTemperature(H, freq_table)
        elif rule == "llama4":
            fn = Llama4Temperature(H, opts["beta"], opts["floor_scale"])
        elif rule == "ssa-official":
            fn = OfficialPositionTemperature(H, opts["beta"])
        else:
            raise UserError(f"unknown temperature rule {rule!r}: use one of {', '.join(RULES)}")
        ref = next(temps.fns["query"].parameters(), None)
        if ref is not None:
            fn.to(device=ref.device)
        temps.fns["query"] = fn
        new.append(fn)
    if rule == "freq":
        model.register_forward_pre_hook(
            _StashInputIds([m for m in new if isinstance(m, FrequencyTemperature)]), with_kwargs=True
        )
    return new


# ------------------------------------------------------------------------------------------- the registry


@dataclass
class Applied:
    """What a method added: ``new_parameters`` (counted as new) and, among them or SSA's, the
    ``temperature_parameters`` (temperature learning rate, no weight decay)."""

    new_parameters: list[nn.Parameter] = field(default_factory=list)
    temperature_parameters: list[nn.Parameter] = field(default_factory=list)


@dataclass
class MethodContext:
    ssa: SSAConfig  # TrainConfig.ssa resolved (SSA methods)
    seq_len: int
    options: dict[str, Any]  # the method's defaults updated with TrainConfig.method_options
    train_tokens: np.ndarray | None = None  # freq: the train split
    vocab: int | None = None


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[[nn.Module, MethodContext], Applied]
    uses_ssa: bool = False  # whether TrainConfig.ssa configures it (and from_pretrained reloads it)
    options: dict[str, Any] = field(default_factory=dict)  # option -> default (None: derived, see options_for)
    needs_train_tokens: bool = False

    derived: Callable[[int], dict[str, Any]] | None = None  # defaults that follow the training length

    def options_for(self, seq_len: int, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """The defaults (those derived from the training length filled in) updated with ``given``."""
        opts = dict(self.options)
        if self.derived is not None:
            opts.update({k: v for k, v in self.derived(seq_len).items() if opts.get(k) is None})
        opts.update({k: v for k, v in (given or {}).items() if v is not None})
        return opts

    def check_options(self, given: dict[str, Any]) -> None:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise UserError(f"method {self.name}: unknown option(s) {', '.join(unknown)} (known: {known})")
        for k, v in given.items():
            if v is not None and not isinstance(v, (int, float)) or isinstance(v, bool):
                raise UserError(f"method {self.name}: option {k} must be a number, got {v!r}")
        if self.name == "llama4" and given.get("floor_scale") is not None and given["floor_scale"] < 1:
            raise UserError("method llama4: floor_scale must be >= 1")


def _vanilla(model: nn.Module, ctx: MethodContext) -> Applied:
    return Applied()


def _ssa(model: nn.Module, ctx: MethodContext) -> Applied:
    from selective_attention import hf

    if not getattr(model.config, "ssa", None):  # an SSA checkpoint is fine-tuned as it is
        hf.convert(model, ctx.ssa or SSAConfig())
    temps = temperature_parameters(model)
    return Applied(temps, temps)


def _ssa_pos(model: nn.Module, ctx: MethodContext) -> Applied:
    ssa = SSAConfig.from_dict({**ctx.ssa.to_dict(), "token_aware": False, "value": False, "query": True})
    return _ssa(model, MethodContext(ssa, ctx.seq_len, ctx.options))


def _vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding of a transformers model."""
    return cast(nn.Embedding, cast("PreTrainedModel", model).get_input_embeddings()).num_embeddings


def _rule(name: str) -> Callable[[nn.Module, MethodContext], Applied]:
    def apply(model: nn.Module, ctx: MethodContext) -> Applied:
        from selective_attention import hf

        if getattr(model.config, "ssa", None) or hf.is_converted(model):
            raise UserError(f"method {name} needs a model without SSA (this one is SSA-converted)")
        hf.convert(model, QUERY_CARRIER)
        table = None
        if name == "freq":
            if ctx.train_tokens is not None:
                table = frequency_table(
                    ctx.train_tokens, ctx.vocab or _vocab_size(model), ctx.options["lo"], ctx.options["hi"]
                )
            else:  # loading a saved model: the saved table replaces this placeholder
                table = torch.ones(ctx.vocab or _vocab_size(model))
        new = install_rule(model, name, ctx.seq_len, table, ctx.options)
        params = [p for m in new for p in m.parameters()]
        return Applied(params, params)

    return apply


def _gated(model: nn.Module, ctx: MethodContext) -> Applied:
    gates = install_gates(model, ctx.options["scale"])
    return Applied([p for g in gates for p in g.parameters()], [])


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("vanilla", _vanilla),
        Method("ssa", _ssa, uses_ssa=True),
        Method("ssa-pos-head", _ssa_pos, uses_ssa=True),
        Method("ssa-official", _rule("ssa-official"), options={"beta": 2.0}),
        Method("const", _rule("const")),
        Method("yarn", _rule("yarn"), options={"coefficient": 0.1}),
        Method(
            "ssmax",
            _rule("ssmax"),
            options={"s_init": None},
            derived=lambda seq_len: {"s_init": ScalableSoftmaxTemperature.default_s(seq_len)},
        ),
        Method("freq", _rule("freq"), options={"lo": 0.25, "hi": 4.0}, needs_train_tokens=True),
        Method(
            "llama4",
            _rule("llama4"),
            options={"beta": 0.1, "floor_scale": None},
            derived=lambda seq_len: {"floor_scale": max(1, seq_len // 16)},
        ),
        Method("gated", _gated, options={"scale": 2.0}),
    )
}


ALIASES = {"ssa-pos": "ssa-pos-head"}  # older names, kept so that saved runs and configs load


def get_method(name: str) -> Method:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise UserError(f"unknown attention method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def apply_method(
    model: nn.Module,
    name: str,
    *,
    ssa: SSAConfig | None = None,
    seq_len: int,
    options: dict[str, Any] | None = None,
    train_tokens: np.ndarray | None = None,
    vocab: int | None = None,
) -> Applied:
    """Apply method ``name`` to ``model`` in place; non-SSA methods record themselves in model.config."""
    method = get_method(name)
    opts = method.options_for(seq_len, options)
    method.check_options(options or {})
    applied = method.apply(model, MethodContext(ssa or SSAConfig(), seq_len, opts, train_tokens, vocab))
    if name != "vanilla" and not method.uses_ssa:
        setattr(model.config, METHOD_ATTR, {"name": name, "options": opts, "seq_len": seq_len, "vocab": vocab})
    return applied


def parameter_counts(model: nn.Module, applied: Applied | None = None) -> dict[str, Any]:
    """{"base", "new", "total", "percent"} with the method's new parameters as "new" (tied weights once);
    without ``applied``, SSA's temperatures are the new ones (``hf.parameter_report``)."""
    if applied is None:
        from selective_attention import hf

        return dict(hf.parameter_report(model))
    total = sum(p.numel() for p in model.parameters())
    new = sum(p.numel() for p in {id(p): p for p in applied.new_parameters}.values())
    base = total - new
    return {"base": base, "new": new, "total": total, "percent": 100.0 * new / base if base else 0.0}


def load_model(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a trained model directory of any method: SSA / vanilla through ``hf.load_pretrained``,
    the others by applying the recorded method to the base model and loading its tensors."""
    from selective_attention import hf

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"not a Hugging Face model directory (no config.json): {path}")
    rec = read_json(cfg_file, "a Hugging Face model's config").get(METHOD_ATTR)
    if rec is None:
        return hf.load_pretrained(path, **kwargs)[0]  # a one-line UserError for whatever does not load
    try:
        return _load_method_model(path, rec, **kwargs)
    except UserError:
        raise
    except Exception as e:  # a broken config or weights: one line, never a traceback at the CLI
        msg = first_line(e) or type(e).__name__
        raise UserError(f"cannot load model {path}: {msg}") from e


def _load_method_model(path: Path, rec: dict[str, Any], **kwargs: Any) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the stock class reports the method's tensors as unexpected keys: expected
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if hasattr(model.config, "ssa"):
        del model.config.ssa  # the carrier's record: apply_method converts afresh
    before = set(model.state_dict())
    apply_method(model, rec["name"], seq_len=rec["seq_len"], options=rec["options"], vocab=rec.get("vocab"))
    new_keys = set(model.state_dict()) - before
    files = sorted(path.glob("model*.safetensors"))
    saved: dict[str, Tensor] = {}
    for f in files:
        saved.update({k: v for k, v in load_file(str(f)).items() if k in new_keys})
    missing = sorted(new_keys - set(saved))
    if missing:
        raise ValueError(f"{path}: the {rec['name']} tensors are missing ({missing[:3]})")
    model.load_state_dict(saved, strict=False)
    return model
