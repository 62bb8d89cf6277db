"""The fused SSA op: temperatures are folded into q / k / v, then one ordinary SDPA call does the rest.

Because each temperature is a per-token scalar,  softmax(s <tau_q q_i, tau_k k_j>) (tau_v v_j)  equals SDPA on
(tau_q * q, tau_k * k, tau_v * v). No T x T matrix is built unless the caller passes an explicit mask.

Packed documents (several documents in one sequence, each attending only to itself): ``document_mask`` builds the
block-diagonal causal mask once per batch - a boolean (B, 1, Tq, Tk) tensor for SDPA, or on CUDA a flex-attention
``BlockMask`` that skips the blocks between documents - and ``document_positions`` the positions inside each
document. The temperatures fold into q / k / v exactly as without documents; only the mask differs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs (temperatures are never applied in low precision), float64 stays;
    float32 for anything else (float8, integer or quantised storage)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for ``device``'s type: temperatures are computed in float32 (or float64) under any autocast
    (autocast would run their einsum / linear in bf16 and round tau to steps of 2^-7 around 1)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _scale(x: Tensor, tau: Tensor) -> Tensor:
    dt = compute_dtype(x)
    return (x.to(dt) * tau.to(dt).unsqueeze(-1)).to(x.dtype)


class _ScaleByTemperature(torch.autograd.Function):
    """x * tau with a backward that keeps only x and tau (no float32 copy of a bf16 x is saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, tau: Tensor) -> Tensor:
        ctx.save_for_backward(x, tau)
        return _scale(x, tau)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, tau = ctx.saved_tensors
        dt = compute_dtype(x)
        gx = _scale(grad, tau) if ctx.needs_input_grad[0] else None
        gtau = None
        if ctx.needs_input_grad[1]:
            gtau = (grad.to(dt) * x.to(dt)).sum(-1).sum_to_size(tau.shape).to(tau.dtype)
        return gx, gtau


def apply_temperature(x: Tensor, tau: Tensor | None) -> Tensor:
    """x (B, H, T, D) times tau (broadcastable to (B, H, T)), multiplied in float32 (or x's wider dtype),
    returned in x's dtype."""
    if tau is None:
        return x
    if torch.is_grad_enabled() and (x.requires_grad or tau.requires_grad):
        if torch.compiler.is_compiling():
            # a checkpointed region: the partitioner recomputes the product in backward instead of saving it
            return checkpoint(_scale, x, tau, use_reentrant=False)
        return _ScaleByTemperature.apply(x, tau)
    return _scale(x, tau)


_KEEP_SCALED_COPIES = False  # True only inside keep_scaled_copies(): a memory benchmark's reference row


@contextlib.contextmanager
def keep_scaled_copies() -> Iterator[None]:
    """For measurement only: inside, eager SSA saves what plain autograd would (every scaled copy x * tau, the
    token term's intermediates) instead of recomputing them in backward; the numbers are the same, the memory is
    what the recomputation saves (``ssa bench memory``'s ``eager-no-recompute`` row)."""
    global _KEEP_SCALED_COPIES
    before, _KEEP_SCALED_COPIES = _KEEP_SCALED_COPIES, True
    try:
        yield
    finally:
        _KEEP_SCALED_COPIES = before


def recomputation_enabled() -> bool:
    """False inside ``keep_scaled_copies``."""
    return not _KEEP_SCALED_COPIES


def recomputing(scaled: list[tuple[Tensor, Tensor, Tensor | None]]) -> contextlib.AbstractContextManager:
    """The one recomputing path of the fused op, the layer and the Hugging Face attention functions: run the
    attention kernel inside this context and it keeps (x, tau) instead of each scaled input. ``scaled`` lists
    (s, x, tau) with s = ``apply_temperature(x, tau)`` as the kernel receives it, or a copy of it with the same
    shape (e.g. a KV cache's concatenation onto an empty past); tau None: s holds x's values in another storage
    (a fused projection's rejoined output), so x is kept in its place. What the kernel saves of s reshaped (eager
    attention's matmul flattens its inputs, copying a non-contiguous one) is rebuilt the same way. A no-op
    without grad or with nothing scaled, and under torch.compile, where saved-tensor hooks cannot be traced:
    ``apply_temperature`` makes the product a checkpointed region there, which the partitioner recomputes in
    backward."""
    if torch.compiler.is_compiling() or not (scaled and torch.is_grad_enabled()) or _KEEP_SCALED_COPIES:
        scaled.clear()
        return contextlib.nullcontext()
    return _recompute_scaled_inputs(scaled)


class _Scaled:
    """What the kernel keeps in place of a scaled input s: x, tau (None: s holds x's values), their versions, s's
    shape and strides, and the saved tensor's shape and strides when the kernel saved s reshaped (``reshaped``)."""

    __slots__ = ("x", "x_version", "tau", "tau_version", "shape", "stride", "reshaped")

    def __init__(
        self,
        x: Tensor,
        tau: Tensor | None,
        shape: torch.Size,
        stride: tuple[int, ...],
        reshaped: tuple[torch.Size, tuple[int, ...]] | None = None,
    ) -> None:
        self.x, self.x_version, self.tau, self.shape, self.stride = x, x._version, tau, shape, stride
        self.tau_version = None if tau is None else tau._version
        self.reshaped = reshaped

    def rebuild(self) -> Tensor:
        """The saved tensor again: s = x * tau (or x) with s's strides, reshaped as the kernel saved it, so the
        kernel's backward sees the very tensor it saved."""
        s = self._product()
        if self.reshaped is None:
            return s
        shape, stride = self.reshaped
        t = s.reshape(shape)  # what the kernel did to s (a view, or a contiguous copy where no view exists)
        if t.stride() == stride:
            return t
        return torch.empty_strided(shape, stride, dtype=t.dtype, device=t.device).copy_(t)

    def _product(self) -> Tensor:
        x, tau = self.x, self.tau
        if tau is None:
            s = x
        elif x.dtype == compute_dtype(x) and not torch.is_grad_enabled():
            # the product written straight into the saved layout (one pass instead of product + copy); the same
            # elementwise products as _scale, which only adds casts that are no-ops in this dtype
            out = torch.empty_strided(self.shape, self.stride, dtype=x.dtype, device=x.device)
            return torch.mul(x, tau.to(x.dtype).unsqueeze(-1), out=out)
        else:
            s = _scale(x, tau)  # (B, H, T, D)
        if s.stride() == self.stride:
            return s
        return torch.empty_strided(s.shape, self.stride, dtype=s.dtype, device=s.device).copy_(s)


# autograd nodes of a reshape (view, or copy in logical order): a tensor that the kernel saves and that reaches one
# of its scaled inputs through these alone, with as many elements, is that input reshaped (eager attention's
# matmul flattens (B, H, T, D) to (B * H, T, D), copying a non-contiguous query)
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "CloneBackward0", "ExpandBackward0"})


def _reshape_of(t: Tensor, node: object, output_nr: int, depth: int = 6) -> bool:
    """Whether ``t`` is output ``output_nr`` of autograd node ``node`` reshaped by ``_RESHAPES`` alone."""
    fn = t.grad_fn
    for _ in range(depth):
        if fn is None or fn.name() not in _RESHAPES:
            return False
        nxt = [(f, nr) for f, nr in fn.next_functions if f is not None]
        if len(nxt) != 1:
            return False
        fn, nr = nxt[0]
        if fn is node:
            return nr == output_nr
    return False


def _outer_saved_tensors_hooks() -> tuple | None:
    """The (pack, unpack) saved-tensor hooks in force, or None (private torch API: None where it is missing)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        hooks = None if top is None else top(False)
    except (RuntimeError, TypeError):
        return None
    return hooks if hooks and hooks[0] is not None else None


def _recompute_scaled_inputs(scaled: list[tuple[Tensor, Tensor, Tensor | None]]):
    """Saved-tensor hooks that make the attention kernel save (x, tau) instead of its scaled copy x * tau, and
    recompute the product in backward: SSA then keeps no more activations than plain SDPA (x and tau are
    saved by the scaling anyway); the price is one elementwise product per input in backward. The product is
    rebuilt with the saved tensor's own strides, so the kernel's backward sees the very tensor it saved.

    Holding x and tau directly would bypass autograd's check that saved tensors are not modified in place
    before backward (a KV cache slice written after the forward would silently corrupt dq): their version
    counters are recorded here and compared in backward, raising the same RuntimeError autograd raises."""

    # Identify the scaled copies by address only: holding them here (the hooks outlive forward) would keep
    # them alive until backward, the very cost this avoids.
    def address(t: Tensor) -> tuple:  # the layout too: a transposed alias of the same storage is another tensor
        return t.data_ptr(), t.shape, t.dtype, t.stride(), t.storage_offset()

    keys = [(address(s), (s.grad_fn, s.output_nr, s.numel()), x, tau) for s, x, tau in scaled]
    scaled.clear()
    # hooks already in force (the saved-bytes test's counter, save_on_cpu) still see every other saved tensor
    outer = _outer_saved_tensors_hooks()

    def pack(t: Tensor):
        for key, _, x, tau in keys:
            if address(t) == key:
                return _Scaled(x, tau, t.shape, t.stride())
        for key, (node, nr, numel), x, tau in keys:  # s reshaped by the kernel
            if node is not None and t.numel() == numel and t.dtype == key[2] and _reshape_of(t, node, nr):
                return _Scaled(x, tau, key[1], key[3], (t.shape, t.stride()))
        return t if outer is None else outer[0](t)

    def unpack(p):
        if not isinstance(p, _Scaled):
            return p if outer is None else outer[1](p)
        for name, t, version in (("input", p.x, p.x_version), ("temperature", p.tau, p.tau_version)):
            if t is not None and t._version != version:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: the SSA attention {name} of shape {tuple(t.shape)} is at version "
                    f"{t._version}; expected version {version} instead (it was changed in place between "
                    f"forward and backward, e.g. a KV cache written after the forward)"
                )
        return p.rebuild()

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _check_tau(name: str, tau: Tensor | None, shape: tuple[int, int, int]) -> None:
    if tau is None:
        return
    if not isinstance(tau, Tensor):
        raise ValueError(f"{name} must be a tensor or None, got {type(tau).__name__}")
    try:
        torch.broadcast_shapes(tuple(tau.shape), shape)
        ok = tau.dim() <= 3 and torch.broadcast_shapes(tuple(tau.shape), shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(tau.shape)} does not broadcast to (B, H, T) = {shape}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, is_causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-d tensor (B, H, T, D), got "
                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch size or head dim")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if is_causal and q.shape[2] > k.shape[2]:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={q.shape[2]} Tk={k.shape[2]}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


BACKENDS = ("auto", "sdpa", "flex")  # how document_mask masks: auto = flex on CUDA where available, else sdpa


def flex_available(device: torch.device) -> bool:
    """Whether flex attention can run forward and backward on ``device`` (CUDA only: it has no CPU backward)."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def is_block_mask(mask: object) -> bool:
    """Whether ``mask`` is a flex-attention BlockMask (without importing flex attention where it is absent)."""
    return type(mask).__name__ == "BlockMask" and hasattr(mask, "mask_mod")


def _document_ids(document_ids: Tensor, batch: int | None = None) -> Tensor:
    """document_ids (T,) or (B, T) of an integer dtype, as (B|1, T)."""
    if not isinstance(document_ids, Tensor) or document_ids.dim() not in (1, 2) or document_ids.is_floating_point():
        raise ValueError(
            "document_ids must be an integer tensor of shape (T,) or (B, T), got "
            f"{tuple(document_ids.shape) if isinstance(document_ids, Tensor) else type(document_ids)}"
        )
    ids = document_ids[None] if document_ids.dim() == 1 else document_ids
    if batch is not None and ids.shape[0] not in (1, batch):
        raise ValueError(f"document_ids of shape {tuple(document_ids.shape)} do not match batch size {batch}")
    return ids


def document_positions(document_ids: Tensor) -> Tensor:
    """1-indexed positions inside each document: (T,) or (B, T) ids -> the same shape, 1 wherever a document
    begins (where the id changes, and at the first token). A window that starts inside a document needs that
    document's offset added by the caller: the ids alone cannot tell where it began."""
    ids = _document_ids(document_ids)  # (B, T)
    T = ids.shape[-1]
    idx = torch.arange(T, device=ids.device).expand_as(ids)
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    start = torch.where(new, idx, 0).cummax(-1).values  # index of the current document's first token
    pos = idx - start + 1
    return pos[0] if document_ids.dim() == 1 else pos


def document_mask(document_ids: Tensor, q_len: int | None = None, *, backend: str = "auto") -> Tensor:
    """The causal mask of packed documents: query i sees key j iff j <= i and both are in the same document.

    document_ids (Tk,) or (B, Tk), one id per key (equal ids = one document, consecutive); the queries are the
    last ``q_len`` keys (default all, as in cached decoding). Build it once per batch and pass it to every layer
    as ``attn_mask``. Returns a boolean (B|1, 1, Tq, Tk) tensor (``backend="sdpa"``; SDPA's fused kernels take it,
    no float mask per head), or a flex-attention BlockMask (``"flex"``; ``"auto"`` picks it on CUDA where flex
    attention is available), which attention then uses as it is: it already holds the causal part."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    ids = _document_ids(document_ids)  # (B, Tk)
    Tk = ids.shape[-1]
    Tq = Tk if q_len is None else int(q_len)
    if not 1 <= Tq <= Tk:
        raise ValueError(f"q_len must be in [1, {Tk}], got {q_len}")
    if backend == "flex" or (backend == "auto" and flex_available(ids.device)):
        return _flex_document_mask(ids, Tq)
    same = ids[:, None, Tk - Tq :, None] == ids[:, None, None, :]  # (B, 1, Tq, Tk)
    return same & torch.ones(Tq, Tk, dtype=torch.bool, device=ids.device).tril(Tk - Tq)


def _flex_document_mask(ids: Tensor, q_len: int):
    from torch.nn.attention.flex_attention import create_block_mask

    B, Tk = ids.shape
    offset = Tk - q_len  # query i is key offset + i

    def mask_mod(b, h, q, kv):
        return (q + offset >= kv) & (ids[b, q + offset] == ids[b, kv])

    # H=None: one mask for every head (the flex counterpart of SDPA's broadcast head dimension)
    return create_block_mask(mask_mod, B, None, q_len, Tk, device=ids.device)


_compiled_flex = None


def flex_attend(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float | None = None, gqa: bool = False) -> Tensor:
    """flex attention (compiled once on CUDA: uncompiled it materialises the scores)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn: Callable[..., Tensor] = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(
            "flex attention has no backward on CPU: build the mask with document_mask(..., backend='sdpa')"
        )
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def _merge_causal(attn_mask: Tensor, tq: int, tk: int) -> Tensor:
    """An explicit mask AND the bottom-right-aligned causal mask (query i sits at absolute position tk-tq+i)."""
    causal = torch.ones(tq, tk, dtype=torch.bool, device=attn_mask.device).tril(tk - tq)
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


def selective_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau_q: Tensor | None = None,
    tau_v: Tensor | None = None,
    tau_k: Tensor | None = None,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    dropout_p: float = 0.0,
    document_ids: Tensor | None = None,
) -> Tensor:
    """Selective self-attention, the SSA counterpart of ``F.scaled_dot_product_attention``.

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D) with H % Hkv == 0 (GQA / MQA); tau_q broadcastable to (B, H, Tq);
    tau_k, tau_v broadcastable to (B, Hkv, Tk). With ``is_causal`` and Tq < Tk (cached decoding) query i is at
    absolute position Tk - Tq + i. ``attn_mask`` (bool: True = attend, or additive float) broadcastable to
    (B, H, Tq, Tk) is combined with the causal mask; a flex-attention BlockMask (``document_mask`` on CUDA) runs
    flex attention with that mask as it is. ``document_ids`` (Tk,) or (B, Tk): packed documents, each attending
    causally to itself only (``document_mask``, built here; to build it once per batch, pass it as ``attn_mask``).
    Returns (B, H, Tq, D) in q's dtype.
    """
    _check_inputs(q, k, v, dropout_p, is_causal)
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if document_ids is not None:
        if _document_ids(document_ids, B).shape[-1] != Tk:
            raise ValueError(f"document_ids of shape {tuple(document_ids.shape)} must cover the Tk={Tk} keys")
        # flex's kernels want a power-of-two head dim >= 16; elsewhere SDPA with the boolean mask
        D = q.shape[-1]
        flex = attn_mask is None and dropout_p == 0.0 and D >= 16 and D & (D - 1) == 0 and flex_available(q.device)
        docs = document_mask(document_ids, Tq, backend="flex" if flex else "sdpa")
        if attn_mask is None:
            attn_mask = docs
        elif is_block_mask(attn_mask):
            raise ValueError("pass either document_ids or a BlockMask, not both")
        else:  # the caller's mask AND the documents' (the documents' already holds the causal part)
            attn_mask = (
                attn_mask & docs
                if attn_mask.dtype == torch.bool
                else torch.where(
                    docs, attn_mask, torch.tensor(-math.inf, dtype=attn_mask.dtype, device=attn_mask.device)
                )
            )
        is_causal = False
    if attn_mask is not None and is_block_mask(attn_mask):
        if dropout_p:
            raise ValueError("flex attention (a BlockMask) has no dropout: use a boolean mask with dropout_p > 0")
    _check_tau("tau_q", tau_q, (B, H, Tq))
    _check_tau("tau_k", tau_k, (B, Hkv, Tk))
    _check_tau("tau_v", tau_v, (B, Hkv, Tk))
    scaled: list[tuple[Tensor, Tensor, Tensor | None]] = []
    for name, x, tau in (("q", q, tau_q), ("k", k, tau_k), ("v", v, tau_v)):
        if tau is not None:
            s = apply_temperature(x, tau)
            scaled.append((s, x, tau))
            q, k, v = (s if name == "q" else q, s if name == "k" else k, s if name == "v" else v)
    if attn_mask is not None and is_block_mask(attn_mask):
        # the compiled flex kernel keeps the scaled q / k / v for its backward (saved-tensor hooks are not
        # applied to it): more activation memory than the SDPA path, the same values
        return flex_attend(q, k, v, attn_mask, scale, H != Hkv)
    causal_flag = False
    if is_causal:
        if attn_mask is not None:
            attn_mask = _merge_causal(attn_mask, Tq, Tk)
        elif Tq == Tk:
            causal_flag = True  # fused kernels mask internally: nothing materialised
        elif Tq > 1 and torch.compiler.is_compiling():
            # the lazy CausalBias subclass below cannot be built inside a graph: a (Tq, Tk) bool mask instead
            attn_mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        elif Tq > 1:
            attn_mask = causal_lower_right(Tq, Tk)  # a lazy bias object, not a dense matrix
        # Tq == 1 < Tk: the single new query sees every cached key, no mask needed

    def attend() -> Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=causal_flag,
            scale=scale,
            enable_gqa=H != Hkv,
        )

    with recomputing(scaled):
        return attend()


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tau_q: Tensor | None = None,
    tau_v: Tensor | None = None,
    tau_k: Tensor | None = None,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The naive, materialised form (the public code's): explicit logits, mask, softmax. Testing and benchmarks.

    Temperatures are applied where the formula puts them: tau_q and tau_k scale the logits, tau_v each value.
    """
    _check_inputs(q, k, v, 0.0, is_causal)
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rep = H // Hkv
    k_full = k.repeat_interleave(rep, dim=1)
    v_full = v.repeat_interleave(rep, dim=1)
    s = 1.0 / math.sqrt(D) if scale is None else scale
    logits = s * (q @ k_full.transpose(-2, -1))  # (B, H, Tq, Tk)
    if tau_q is not None:
        logits = logits * tau_q.to(logits.dtype).expand(B, H, Tq).unsqueeze(-1)
    if tau_k is not None:
        logits = logits * tau_k.to(logits.dtype).expand(B, Hkv, Tk).repeat_interleave(rep, 1).unsqueeze(-2)
    if is_causal:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    weights = torch.softmax(logits, dim=-1)
    if tau_v is not None:
        v_full = v_full * tau_v.to(v.dtype).expand(B, Hkv, Tk).repeat_interleave(rep, 1).unsqueeze(-1)
    out = weights @ v_full
    return (out, weights) if return_weights else out
