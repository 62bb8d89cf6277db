"""The forward hooks that feed SSA temperatures into a stock ``transformers`` attention module.

- a pre-hook on the attention module remembers the hidden state x and each token's absolute 1-indexed position
  (``position_ids + 1``: left padding and the KV cache are handled exactly as the base model does);
- a hook on each projection computes tau from its pre-RoPE output; the key / value temperatures multiply the new
  tokens right away (or the output of the norm that follows the projection), so the KV cache stores scaled
  keys / values and cached decoding equals the full forward; tau_q waits for the attention function
  (``hf/attention.py``), which applies it after RoPE and any q-norm (a per-token scalar commutes with RoPE);
- a hook on the attention module drops the captured tensors, and refuses a forward in which tau_q was not
  applied (an attention implementation that is not an SSA one).

Hooks are small callable classes (not closures) so that ``copy.deepcopy(model)`` re-points them at the copy.
Each one is registered on the module that the attention module *currently* holds under the site's attribute
name: the pre-hook re-binds them when that changed (e.g. PEFT replaced ``q_proj`` by a LoRA wrapper).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from selective_attention.functional import apply_temperature
from selective_attention.hf.site import BHTD, BTHD, FLAT, Site
from selective_attention.hf.state import SSAState, ssa_state, ssa_temperatures


def _find_positions(x: Tensor, kwargs: dict[str, Any], layer_idx: int | None) -> Tensor:
    """Absolute 1-indexed positions (B|1, T): HF's position_ids + 1 (generate derives them from the attention mask
    under left padding), else the cache length offset."""
    T = x.shape[1]
    pos = kwargs.get("position_ids")
    if isinstance(pos, Tensor):
        if pos.dim() == 3:  # multimodal rotary (3, B, T): the temporal stream is the text position
            pos = pos[0]
        pos = pos if pos.dim() == 2 else pos[None]
        if pos.shape[-1] == T:
            return pos + 1
    past = 0
    for v in kwargs.values():
        if isinstance(v, Cache):
            past = v.get_seq_length(layer_idx or 0)
            break
    return torch.arange(past + 1, past + T + 1, device=x.device)[None]


def _scale(st: SSAState, target: str, t: Tensor, tau: Tensor, layout: str, heads: int, head_dim: int) -> Tensor:
    """t in ``layout`` times tau (B|1, heads, T), multiplied in float32, returned in t's dtype. Through the fused
    op's ``apply_temperature``: its backward keeps t and tau, not a float32 copy of a bf16 t. The product is noted
    in ``st.scaled`` so that the attention kernel keeps t instead of it (hf/attention.py)."""
    if layout == FLAT:
        B, T = t.shape[:2]
        return _scale(st, target, t.view(B, T, heads, head_dim), tau, BTHD, heads, head_dim).reshape(t.shape)
    x = t if layout == BHTD else t.transpose(1, 2)  # (B, H, T, D), a view
    s = apply_temperature(x, tau)
    if not torch.compiler.is_compiling() and s.grad_fn is not None:  # compiled: a checkpointed region instead
        st.scaled[target] = (s.grad_fn, x, tau)
    return s if layout == BHTD else s.transpose(1, 2)  # BTHD: back to the caller's layout


def _compute(attn: nn.Module, st: SSAState, target: str, proj: Tensor) -> Tensor:
    """tau (B|1, heads, T) for ``target`` from its pre-RoPE projection proj (B, heads, T, D)."""
    if st.hidden is None or st.positions is None:
        raise RuntimeError("SSA: a projection ran outside its attention module's forward")
    return ssa_temperatures(attn)(target, projection=proj, hidden=st.hidden, positions=st.positions)


def _note(st: SSAState, target: str, tau: Tensor | None) -> None:
    if st.record is not None and st.record:
        st.record[-1][target] = None if tau is None else tau.detach().float()


class _ProjectionHook:
    """Forward hook on a separate projection (B, T, heads * D) that feeds one or more targets."""

    def __init__(self, attn: nn.Module, targets: tuple[str, ...]) -> None:
        self.attn, self.targets = attn, targets

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        st = ssa_state(self.attn)
        site, new = st.site, None
        for target in self.targets:
            heads = site.heads(target)
            B, T = out.shape[:2]
            tau = _compute(self.attn, st, target, out.view(B, T, heads, st.head_dim).transpose(1, 2))
            _note(st, target, tau)
            if target == "query":
                st.tau_q = tau  # applied after RoPE in the attention function
            elif target in site.norms:
                st.pending[target] = tau  # applied to the norm's output
            else:
                new = _scale(st, target, out, tau, FLAT, heads, st.head_dim)  # before the KV cache
        return new


class _NormHook:
    """Forward hook on the norm after a key / value projection: the temperature acts on what the cache stores."""

    def __init__(self, attn: nn.Module, target: str, layout: str) -> None:
        self.attn, self.target, self.layout = attn, target, layout

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        st = ssa_state(self.attn)
        tau = st.pending.pop(self.target, None)
        if tau is None:
            raise RuntimeError(
                f"SSA: {st.site.name or type(self.attn).__name__}: the {self.target} norm ran without its projection"
            )
        heads, T = st.site.heads(self.target), tau.shape[-1]
        layout = FLAT if out.dim() == 3 else self.layout
        expect = {FLAT: (T, heads * st.head_dim), BTHD: (T, heads), BHTD: (heads, T)}[layout]
        if tuple(out.shape[1:3]) != expect:
            raise RuntimeError(
                f"SSA: {st.site.name}: the {self.target} norm's output {tuple(out.shape)} is not laid out as {layout}"
            )
        return _scale(st, self.target, out, tau, layout, heads, st.head_dim)


class Joined:
    """A fused projection's output rejoined with scaled keys / values (``Site.join``), for the attention function:
    a kernel input that is a view of it is kept as the same view of the projection's own output (the query, an
    unscaled part) or as (x, tau) (a scaled part) instead (hf/attention.py), so nothing keeps the rejoined copy
    past the forward."""

    __slots__ = ("joined", "version", "out", "views")

    def __init__(self, joined: Tensor, out: Tensor, views: dict[str, tuple[Tensor, Tensor | None]]) -> None:
        self.joined, self.version, self.out = joined, joined._version, out  # out: the projection's output
        # target -> (x, tau): x (B, heads, T, D) a view of out, and the temperature the join multiplied that part
        # by (None: copied unchanged - the query, and a key / value without a temperature)
        self.views = views

    def place(self, t: Tensor, x: Tensor) -> bool:
        """Whether ``t`` is the view of the rejoined tensor that sits where ``x`` (a view of ``out``) sits in
        ``out``: same storage, untouched since the join, same dtype, shape, strides and relative offset."""
        j, o = self.joined, self.out
        return (
            t.untyped_storage().data_ptr() == j.untyped_storage().data_ptr()
            and x.untyped_storage().data_ptr() == o.untyped_storage().data_ptr()
            and j._version == self.version
            and (j.shape, j.stride(), j.dtype) == (o.shape, o.stride(), o.dtype)
            and (t.shape, t.stride(), t.dtype) == (x.shape, x.stride(), x.dtype)
            and t.storage_offset() - j.storage_offset() == x.storage_offset() - o.storage_offset()
        )


def take_joined(st: SSAState) -> Joined | None:
    """The ``Joined`` record of this forward of a fused site (once; None for separate projections)."""
    hook = st.hooks.get(st.site.fused) if st.site.fused is not None else None
    if not isinstance(hook, _FusedHook):
        return None
    joined, hook.joined = hook.joined, None
    return joined


def _forget_joined(st: SSAState) -> None:
    hook = st.hooks.get(st.site.fused) if st.site.fused is not None else None
    if isinstance(hook, _FusedHook):
        hook.joined = None


class _FusedHook:
    """Forward hook on a fused qkv projection."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn
        self.joined: Joined | None = None  # this forward's rejoined output, until the attention function takes it

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        st = ssa_state(self.attn)
        temps = ssa_temperatures(self.attn)
        split, join = st.site.split, st.site.join
        if split is None or join is None:
            raise RuntimeError(f"SSA: {st.site.name}: a fused site without split / join")
        q, k, v = split(out)  # (B, T, heads, D) each
        parts = {"query": q, "key": k, "value": v}  # views of out
        taus = {
            t: _compute(self.attn, st, t, x.transpose(1, 2)) if t in temps else None
            for t, x in (("query", q), ("key", k), ("value", v))
        }
        for t, tau in taus.items():
            _note(st, t, tau)
        st.tau_q = taus["query"]
        if taus["key"] is None and taus["value"] is None:
            return out
        h, D = st.n_kv_heads, st.head_dim
        k = k if taus["key"] is None else _scale(st, "key", k, taus["key"], BTHD, h, D)
        v = v if taus["value"] is None else _scale(st, "value", v, taus["value"], BTHD, h, D)
        joined = join(out, q, k, v)
        if st.scaled:  # grad on, eager: the attention function may keep views of out instead of joined
            views = {t: (x.transpose(1, 2), None if t == "query" else taus[t]) for t, x in parts.items()}
            self.joined = Joined(joined, out, views)
        return joined


class _CaptureInputs:
    """Forward pre-hook on the attention module: re-bind moved projections, remember x and the positions."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(x, Tensor):
            raise ValueError(f"SSA: cannot find the hidden state passed to {type(module).__name__}")
        st = ssa_state(self.attn)
        bind(self.attn, st)
        st.hidden = x
        st.positions = _find_positions(x, kwargs, getattr(module, "layer_idx", None))
        st.positions_given = isinstance(kwargs.get("position_ids"), Tensor)
        st.tau_q = None
        st.pending, st.scaled = {}, {}
        _forget_joined(st)
        if st.record is not None:
            st.record.append({})  # one entry per forward of this layer


class _Release:
    """Forward hook on the attention module: drop the captured tensors (no activations kept past the layer) and
    refuse a forward whose attention function did not take tau_q."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def __call__(self, module: nn.Module, args: tuple, out: Any) -> None:
        st = ssa_state(self.attn)
        missed = st.tau_q is not None
        unapplied = sorted(st.pending)  # computed for a norm's output, but that norm never ran
        st.hidden = st.positions = st.tau_q = None
        st.pending, st.scaled = {}, {}
        _forget_joined(st)
        if unapplied:
            raise RuntimeError(
                f"SSA: {st.site.name or type(module).__name__}: the {', '.join(unapplied)} "
                "temperature waits for a normalisation that did not run in this forward: it was "
                "not applied"
            )
        if missed:
            impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
            raise RuntimeError(
                f"SSA: {st.site.name or type(module).__name__} ran with attention implementation "
                f"{impl!r}, which drops the query temperature: use set_attn_implementation('sdpa' "
                "or 'eager') on the converted model"
            )


def _unhook(module: nn.Module, hook: Any) -> None:
    for key, fn in list(module._forward_hooks.items()):
        if fn is hook:
            del module._forward_hooks[key]


def bind(attn: nn.Module, st: SSAState) -> None:
    """Register each hook on the module now held under its attribute name (and off the one it replaced)."""
    for name, hook in st.hooks.items():
        mod = getattr(attn, name)
        old = st.bound.get(name)
        if old is mod:
            continue
        if old is not None:
            _unhook(old, hook)
        mod.register_forward_hook(hook)
        st.bound[name] = mod


def install(site: Site, st: SSAState, targets: tuple[str, ...]) -> None:
    """Create the hooks for ``targets`` at ``site`` and register them."""
    attn = site.attn
    attn.register_forward_pre_hook(_CaptureInputs(attn), with_kwargs=True)
    attn.register_forward_hook(_Release(attn))
    if site.fused is not None:
        st.hooks[site.fused] = _FusedHook(attn)
    else:
        by_proj: dict[str, list[str]] = {}
        for t in targets:
            by_proj.setdefault(site.separate[t], []).append(t)
        for name, ts in by_proj.items():
            st.hooks[name] = _ProjectionHook(attn, tuple(ts))
        for t in targets:
            if t in site.norms and t != "query":  # tau_q acts after RoPE / q-norm in the attention function
                norm, layout = site.norms[t]
                st.hooks[norm] = _NormHook(attn, t, layout)
    bind(attn, st)
