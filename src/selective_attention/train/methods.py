"""Attention methods a training run (or a study) can choose by name: ``TrainConfig.attention``.

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

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError, first_line
from selective_attention.temperature import SSATemperatures, log_positions, temperature_parameters

METHOD_ATTR = "ssa_method"  # model.config.ssa_method = {"name": ..., "options": {...}} for the non-SSA methods
QUERY_CARRIER = SSAConfig(init="scratch", value=False, token_aware=False)  # hooks that carry a query rule


# ------------------------------------------------------------------------------------------- query rules


class ConstantTemperature(nn.Module):
    """tau_h: one learned inverse temperature per head, the same for every token and position."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.tau = nn.Parameter(torch.ones(n_heads))

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        T = positions.shape[-1]
        return self.tau.float()[None, :, None].expand(1, -1, T)  # (1, H, T): the same for every token


class YarnTemperature(nn.Module):
    """Fixed 1 + coefficient * ln p (no parameters)."""

    def __init__(self, n_heads: int, coefficient: float = 0.1) -> None:
        super().__init__()
        self.n_heads, self.coefficient = n_heads, coefficient

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        logp = log_positions(positions)
        logp = logp[None] if logp.dim() == 1 else logp  # (B, T)
        return (1.0 + self.coefficient * logp)[:, None, :].expand(-1, self.n_heads, -1)


class ScalableSoftmaxTemperature(nn.Module):
    """Scalable-Softmax: logits times s_h ln n, n = keys visible to the query (= its position p)."""

    def __init__(self, n_heads: int, seq_len: int, s_init: float | None = None) -> None:
        super().__init__()
        self.n_heads = n_heads
        s0 = 1.0 / math.log(max(seq_len, 3)) if s_init is None else s_init
        self.s = nn.Parameter(torch.full((n_heads,), s0))

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        logp = log_positions(positions)
        logp = logp[None] if logp.dim() == 1 else logp
        # p = 1 gives tau = 0: a single visible key gets weight 1 whatever the logit, so nothing is lost
        return self.s.float()[None, :, None] * logp[:, None, :]


class FrequencyTemperature(nn.Module):
    """Fixed tau(t) from the token's training-corpus frequency; needs the input ids (set by a model pre-hook).
    The table is a saved buffer, so a trained model reloads without the corpus."""

    def __init__(self, n_heads: int, table: Tensor) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.register_buffer("table", table.float().clone())  # (vocab,); a copy per layer (saved apart)
        self.input_ids: Tensor | None = None

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        if self.input_ids is None:
            raise RuntimeError("FrequencyTemperature: no input ids (attach it with install_rule)")
        return self.table[self.input_ids][:, None, :].expand(-1, self.n_heads, -1)  # (B, H, T)


class Llama4Temperature(nn.Module):
    """Llama 4's attention temperature tuning: tau = 1 + beta * ln(1 + floor(p / floor_scale)) (no parameters).

    Llama 4 uses beta = 0.1 and floor_scale = 8192 for contexts of 8k tokens and more (on its NoPE layers; here on
    every layer). At our training lengths 8192 would leave tau = 1 everywhere, so the default floor_scale scales
    with the training length: ``seq_len // 16`` (at least 1), i.e. tau steps up 16 times within one sequence
    (256 tokens: floor_scale 16, tau from 1 to 1 + 0.1 ln 17 = 1.28)."""

    def __init__(self, n_heads: int, beta: float = 0.1, floor_scale: int = 8192) -> None:
        super().__init__()
        self.n_heads, self.beta, self.floor_scale = n_heads, beta, floor_scale

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        p = positions.float()
        p = p[None] if p.dim() == 1 else p  # (B, T), 1-indexed
        tau = 1.0 + self.beta * torch.log1p(torch.floor(p / self.floor_scale))
        return tau[:, None, :].expand(-1, self.n_heads, -1)  # (B, H, T)


class OfficialPositionTemperature(nn.Module):
    """The official release's temperature: tau = 1 + c ln p on the query, c = exp(-exp(beta)), one beta per layer
    (shared by its heads). beta = 2.0 starts at c = exp(-e^2) = 6.2e-4, near identity; c stays in (0, 1)."""

    def __init__(self, n_heads: int, beta: float = 2.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.beta = nn.Parameter(torch.full((1,), float(beta)))

    def position_coefficient(self) -> Tensor:
        return torch.exp(-torch.exp(self.beta.float()))  # (1,)

    def forward(self, *, projection=None, hidden=None, positions=None) -> Tensor:
        logp = log_positions(positions)
        logp = logp[None] if logp.dim() == 1 else logp  # (B, T)
        return (1.0 + self.position_coefficient()[:, None, None] * logp[:, None, :]).expand(-1, self.n_heads, -1)


def frequency_table(tokens: np.ndarray, vocab: int, lo: float = 0.25, hi: float = 4.0) -> Tensor:
    """-ln f(t) / H per token id, clamped to [lo, hi]; H = sum f ln(1/f) (so the corpus average is ~1)."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab).astype(np.float64) + 1.0
    f = counts / counts.sum()
    surprisal = -np.log(f)
    entropy = float((f * surprisal).sum())
    return torch.from_numpy(np.clip(surprisal / entropy, lo, hi)).float()


class _StashInputIds:
    """Model forward pre-hook: hand the input ids to every FrequencyTemperature."""

    def __init__(self, modules: list[FrequencyTemperature]) -> None:
        self.modules = modules

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        for m in self.modules:
            m.input_ids = ids


RULES = ("const", "yarn", "ssmax", "freq", "llama4", "ssa-official")


def install_rule(model: nn.Module, rule: str, seq_len: int, freq_table: Tensor | None = None,
                 options: dict[str, Any] | None = None) -> list[nn.Module]:
    """Replace the query temperature of every SSA layer in a converted ``model`` by ``rule``. Returns the new
    modules (their parameters belong in the temperature optimizer group)."""
    opts = {**METHODS[rule].options_for(seq_len), **(options or {})} if rule in METHODS else {}
    new: list[nn.Module] = []
    for temps in [m for m in model.modules() if isinstance(m, SSATemperatures)]:
        H = temps.fns["query"].n_heads
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
        model.register_forward_pre_hook(_StashInputIds([m for m in new if isinstance(m, FrequencyTemperature)]),
                                        with_kwargs=True)
    return new


# ------------------------------------------------------------------------------------------- gated attention


class HeadGate(nn.Module):
    """Headwise output gate g = scale * sigmoid(x W_g), W_g: d_model -> n_heads, from the attention's input x.

    Init: W_g = 0 and scale = 2, so g = 2 * sigmoid(0) = 1 exactly: the model starts as the vanilla function,
    while dL/dW_g = scale * sigmoid'(0) * x * dL/dg = 0.5 * x * dL/dg is non-zero. The gate can still close
    (g -> 0, the paper's sparse gating) and open up to 2. ``scale=1`` gives the paper's plain sigmoid gate
    (g = 0.5 at this init)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, scale: float = 2.0) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.scale = n_heads, head_dim, scale
        self.proj = nn.Linear(d_model, n_heads, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.x: Tensor | None = None  # (B, T, d_model), set by the attention's pre-hook; never in the state dict

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * torch.sigmoid(self.proj(x))  # (B, T, H)


class _CaptureGateInput:
    """Forward pre-hook on the attention module: remember its input hidden state for the gate."""

    def __init__(self, gate: HeadGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(x, Tensor):
            raise ValueError(f"gated attention: cannot find the hidden state passed to {type(module).__name__}")
        self.gate.x = x


class _ApplyGate:
    """Forward pre-hook on o_proj: multiply each head's output (B, T, H * D) by its gate (B, T, H)."""

    def __init__(self, gate: HeadGate) -> None:
        self.gate = gate

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        gate, x = self.gate, self.gate.x
        if x is None:
            raise RuntimeError("gated attention: o_proj ran outside its attention module's forward")
        self.gate.x = None
        out = args[0]  # (B, T, H * D)
        B, T = out.shape[:2]
        g = gate(x).to(out.dtype)  # (B, T, H)
        out = (out.view(B, T, gate.n_heads, gate.head_dim) * g[..., None]).view(out.shape)
        return (out, *args[1:])


def install_gates(model: nn.Module, scale: float = 2.0) -> list[HeadGate]:
    """Add a HeadGate (submodule ``attn_gate``) to every Llama-style attention (one with ``o_proj``)."""
    from selective_attention.hf.convert import find_sites

    try:
        sites = find_sites(model)
    except ValueError as e:
        raise UserError(f"gated attention: {e}") from None
    missing = [type(s.attn).__name__ for s in sites if not isinstance(getattr(s.attn, "o_proj", None), nn.Module)]
    if missing:
        raise UserError(f"gated attention needs Llama-style attention modules with o_proj; {missing[0]} has none "
                        f"(model {type(model).__name__})")
    gates = []
    for s in sites:
        ref = next(s.attn.parameters())
        gate = HeadGate(s.d_model, s.n_heads, s.head_dim, scale).to(device=ref.device, dtype=ref.dtype)
        s.attn.add_module("attn_gate", gate)
        s.attn.register_forward_pre_hook(_CaptureGateInput(gate), with_kwargs=True)
        s.attn.o_proj.register_forward_pre_hook(_ApplyGate(gate))
        gates.append(gate)
    return gates


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

    def options_for(self, seq_len: int, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """The defaults (those derived from the training length filled in) updated with ``given``."""
        opts = dict(self.options)
        if self.name == "llama4" and opts.get("floor_scale") is None:
            opts["floor_scale"] = max(1, seq_len // 16)
        if self.name == "ssmax" and opts.get("s_init") is None:
            opts["s_init"] = 1.0 / math.log(max(seq_len, 3))
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


def _rule(name: str) -> Callable[[nn.Module, MethodContext], Applied]:
    def apply(model: nn.Module, ctx: MethodContext) -> Applied:
        from selective_attention import hf

        if getattr(model.config, "ssa", None) or hf.is_converted(model):
            raise UserError(f"method {name} needs a model without SSA (this one is SSA-converted)")
        hf.convert(model, QUERY_CARRIER)
        table = None
        if name == "freq":
            if ctx.train_tokens is not None:
                table = frequency_table(ctx.train_tokens, ctx.vocab or model.get_input_embeddings().num_embeddings,
                                        ctx.options["lo"], ctx.options["hi"])
            else:  # loading a saved model: the saved table replaces this placeholder
                table = torch.ones(ctx.vocab or model.get_input_embeddings().num_embeddings)
        new = install_rule(model, name, ctx.seq_len, table, ctx.options)
        params = [p for m in new for p in m.parameters()]
        return Applied(params, params)
    return apply


def _gated(model: nn.Module, ctx: MethodContext) -> Applied:
    gates = install_gates(model, ctx.options["scale"])
    return Applied([p for g in gates for p in g.parameters()], [])


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("vanilla", _vanilla),
    Method("ssa", _ssa, uses_ssa=True),
    Method("ssa-pos-head", _ssa_pos, uses_ssa=True),
    Method("ssa-official", _rule("ssa-official"), options={"beta": 2.0}),
    Method("const", _rule("const")),
    Method("yarn", _rule("yarn"), options={"coefficient": 0.1}),
    Method("ssmax", _rule("ssmax"), options={"s_init": None}),
    Method("freq", _rule("freq"), options={"lo": 0.25, "hi": 4.0}, needs_train_tokens=True),
    Method("llama4", _rule("llama4"), options={"beta": 0.1, "floor_scale": None}),
    Method("gated", _gated, options={"scale": 2.0}),
)}


ALIASES = {"ssa-pos": "ssa-pos-head"}  # older names, kept so that saved runs and configs load


def get_method(name: str) -> Method:
    name = ALIASES.get(name, name)
    if name not in METHODS:
        raise UserError(f"unknown attention method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def apply_method(model: nn.Module, name: str, *, ssa: SSAConfig | None = None, seq_len: int,
                 options: dict[str, Any] | None = None, train_tokens: np.ndarray | None = None,
                 vocab: int | None = None) -> Applied:
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
    rec = json.loads(cfg_file.read_text()).get(METHOD_ATTR)
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
