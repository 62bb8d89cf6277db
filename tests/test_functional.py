"""The fused op against the naive materialised reference, in float64, gradients included."""

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.attention.bias import CausalBias

import selective_attention.functional as fn
from selective_attention import reference_attention, selective_attention

D64 = torch.float64


def _qkv(B=2, H=4, Hkv=4, Tq=5, Tk=5, D=8, dtype=D64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    return q, k, v, g


def _taus(B, H, Hkv, Tq, Tk, g, dtype=D64):
    tau_q = 0.5 + torch.rand(B, H, Tq, generator=g, dtype=dtype) * 2
    tau_v = 0.5 + torch.rand(B, Hkv, Tk, generator=g, dtype=dtype) * 2
    tau_k = 0.5 + torch.rand(B, Hkv, Tk, generator=g, dtype=dtype) * 2
    return tau_q, tau_v, tau_k


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("Tq,Tk", [(6, 6), (3, 7), (1, 9)])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference(H, Hkv, Tq, Tk, causal):
    q, k, v, g = _qkv(H=H, Hkv=Hkv, Tq=Tq, Tk=Tk)
    tau_q, tau_v, tau_k = _taus(2, H, Hkv, Tq, Tk, g)
    out = selective_attention(q, k, v, tau_q, tau_v, tau_k, is_causal=causal)
    ref = reference_attention(q, k, v, tau_q, tau_v, tau_k, is_causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_no_temperature_is_plain_sdpa():
    q, k, v, _ = _qkv()
    out = selective_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_cached_causal_positions_are_bottom_right():
    # With Tq < Tk, query i is at absolute position Tk - Tq + i: the last Tq rows of the full computation.
    q, k, v, g = _qkv(Tq=8, Tk=8)
    tau_q, tau_v, _ = _taus(2, 4, 4, 8, 8, g)
    full = selective_attention(q, k, v, tau_q, tau_v)
    tail = selective_attention(q[:, :, 5:], k, v, tau_q[:, :, 5:], tau_v)
    torch.testing.assert_close(tail, full[:, :, 5:], atol=1e-12, rtol=0)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [True, False])
def test_explicit_mask(mask_kind, causal):
    q, k, v, g = _qkv(Tq=4, Tk=6)
    tau_q, tau_v, _ = _taus(2, 4, 4, 4, 6, g)
    keep = torch.rand(2, 1, 4, 6, generator=g) > 0.3
    keep[..., 0] = True  # every row keeps at least one visible key
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape, dtype=D64).masked_fill(~keep, float("-inf"))
    out = selective_attention(q, k, v, tau_q, tau_v, attn_mask=mask, is_causal=causal)
    ref = reference_attention(q, k, v, tau_q, tau_v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tau_shape", [(), (1,), (4, 1), (1, 4, 1), (2, 1, 5), (5,)])
def test_broadcastable_temperatures(tau_shape):
    q, k, v, g = _qkv()
    tau = 0.5 + torch.rand(tau_shape, generator=g, dtype=D64)
    out = selective_attention(q, k, v, tau, tau)
    full = tau.expand(2, 4, 5)
    torch.testing.assert_close(out, reference_attention(q, k, v, full, full), atol=1e-6, rtol=1e-6)


def test_scale_argument():
    q, k, v, g = _qkv()
    tau_q, tau_v, _ = _taus(2, 4, 4, 5, 5, g)
    out = selective_attention(q, k, v, tau_q, tau_v, scale=0.1)
    torch.testing.assert_close(out, reference_attention(q, k, v, tau_q, tau_v, scale=0.1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("H,Hkv,Tq,Tk", [(2, 2, 3, 3), (4, 2, 2, 4)])
def test_gradcheck(H, Hkv, Tq, Tk):
    q, k, v, g = _qkv(B=1, H=H, Hkv=Hkv, Tq=Tq, Tk=Tk, D=4)
    tau_q, tau_v, tau_k = _taus(1, H, Hkv, Tq, Tk, g)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, tau_q, tau_v, tau_k)]
    assert gradcheck(lambda *a: selective_attention(*a), inputs, eps=1e-6, atol=1e-5)


def test_gradients_match_reference():
    q, k, v, g = _qkv(H=4, Hkv=2, Tq=3, Tk=6)
    taus = _taus(2, 4, 2, 3, 6, g)
    a = [t.clone().requires_grad_() for t in (q, k, v, *taus)]
    b = [t.clone().requires_grad_() for t in (q, k, v, *taus)]
    selective_attention(*a).pow(2).sum().backward()
    reference_attention(*b).pow(2).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-6)


def test_no_dense_mask_when_none_given(monkeypatch):
    seen = []

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append((attn_mask, kw["is_causal"]))
        return torch.zeros_like(q)

    monkeypatch.setattr(fn.F, "scaled_dot_product_attention", spy)
    q, k, v, g = _qkv(Tq=6, Tk=6)
    tau_q, tau_v, _ = _taus(2, 4, 4, 6, 6, g)
    selective_attention(q, k, v, tau_q, tau_v)
    selective_attention(q[:, :, -1:], k, v, tau_q[:, :, -1:], tau_v)
    selective_attention(q[:, :, -3:], k, v, tau_q[:, :, -3:], tau_v)
    assert seen[0] == (None, True)  # the kernel masks internally
    assert seen[1] == (None, False)  # one new token sees the whole cache
    assert isinstance(seen[2][0], CausalBias)  # lazy: fused kernels apply it without a dense mask


def test_temperatures_applied_in_float32():
    x = torch.randn(1, 2, 3, 8).to(torch.bfloat16)
    tau = torch.tensor(1.0 + 1e-3) * torch.ones(1, 2, 3)
    out = fn.apply_temperature(x, tau)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (x.float() * tau[..., None]).to(torch.bfloat16), atol=0, rtol=0)


def test_low_precision_runs_and_is_close():
    q, k, v, g = _qkv(dtype=torch.float32)
    tau_q, tau_v, _ = _taus(2, 4, 4, 5, 5, g, dtype=torch.float32)
    ref = selective_attention(q, k, v, tau_q, tau_v)
    out = selective_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), tau_q, tau_v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "shapes,kwargs,match",
    [
        (((2, 4, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8)), {}, "multiple"),
        (((2, 4, 5, 8), (2, 4, 5, 8), (2, 4, 6, 8)), {}, "same shape"),
        (((2, 4, 5, 8), (2, 4, 5, 7), (2, 4, 5, 7)), {}, "head dim"),
        (((4, 5, 8), (2, 4, 5, 8), (2, 4, 5, 8)), {}, "4-d"),
        (((2, 4, 6, 8), (2, 4, 5, 8), (2, 4, 5, 8)), {}, "Tq <= Tk"),
        (((2, 4, 5, 8), (2, 4, 5, 8), (2, 4, 5, 8)), {"dropout_p": 1.5}, "dropout_p"),
    ],
)
def test_bad_shapes_raise_value_error(shapes, kwargs, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        selective_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("name,shape", [("tau_q", (2, 4, 6)), ("tau_v", (3, 4, 5)), ("tau_k", (2, 4, 5, 1))])
def test_bad_temperature_shapes_raise(name, shape):
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match=name):
        selective_attention(q, k, v, **{name: torch.ones(shape, dtype=D64)})


@pytest.mark.parametrize("changed", ["k", "v", "tau_v"])
def test_inplace_change_between_forward_and_backward_raises(changed):
    # k / v slices of a preallocated cache (no grad) written after the forward: backward must refuse, as
    # autograd does for plain SDPA, instead of recomputing the scaled copy from the new values (dq was wrong).
    q, _, _, g = _qkv(Tq=4, Tk=6)
    cache = torch.randn(2, 2, 4, 10, 8, generator=g, dtype=D64)
    k, v = cache[0, :, :, :6], cache[1, :, :, :6]
    tau_q, tau_v, tau_k = _taus(2, 4, 4, 4, 6, g)
    q.requires_grad_()
    out = selective_attention(q, k, v, tau_q, tau_v, tau_k)
    {"k": k, "v": v, "tau_v": tau_v}[changed].mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_compute_dtype_of_non_float_storage_is_float32():
    assert fn.compute_dtype(torch.zeros(2, dtype=torch.float8_e4m3fn)) == torch.float32
    assert fn.compute_dtype(torch.zeros(2, dtype=torch.int8)) == torch.float32
    assert fn.compute_dtype(torch.zeros(2, dtype=torch.bfloat16)) == torch.float32
    assert fn.compute_dtype(torch.zeros(2, dtype=D64)) == D64


def _saved_storages(work) -> dict[int, int]:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = work()
    return out, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputing_keeps_x_for_a_kernel_that_reshapes_its_input(dtype):
    # An eager kernel (matmul over (B, H, T, D)) flattens its input: a non-contiguous scaled query is copied, a
    # contiguous scaled value viewed. Neither copy nor view is kept: (x, tau) are, and the backward rebuilds them
    # exactly (the gradients are those of the plain product, bit for bit).
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 7, 4
    q0 = torch.randn(B, T, H, D, generator=g).to(dtype)  # (B, T, H, D) storage: a projection's head view
    k0, v0 = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(2))
    tq0, tv0 = (0.5 + torch.rand(B, H, T, generator=g) for _ in range(2))

    def run(recompute: bool):
        q, k, v = q0.clone().requires_grad_(), k0.clone().requires_grad_(), v0.clone().requires_grad_()
        tq, tv = tq0.clone().requires_grad_(), tv0.clone().requires_grad_()
        qt = q.transpose(1, 2)

        def attend():
            sq, sv = fn.apply_temperature(qt, tq), fn.apply_temperature(v, tv)
            with fn.recomputing([(sq, qt, tq), (sv, v, tv)] if recompute else []):
                w = torch.softmax(torch.matmul(sq, k.transpose(-1, -2)), -1)
                return torch.matmul(w, sv), (sq, sv)

        (out, scaled), saved = _saved_storages(attend)
        out.float().pow(2).sum().backward()
        return out, [q.grad, k.grad, v.grad, tq.grad, tv.grad], saved, {s.untyped_storage().data_ptr() for s in scaled}

    ref, ref_grads, ref_saved, _ = run(False)
    out, grads, saved, scaled = run(True)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    big = B * H * T * D * q0.element_size()
    kept = sorted(n for n in saved.values() if n >= big)
    assert sorted(n for n in ref_saved.values() if n >= big) == sorted([*kept, big, big])  # the copy of sq, sv
    assert not scaled & set(saved)


def test_recomputing_an_alias_keeps_the_original():
    # tau None: the saved tensor holds x's values in another storage (a fused projection rejoined); x is kept
    # instead, and an in-place change of x before backward is refused.
    x = torch.randn(2, 3, 5, 4, dtype=D64)
    w = torch.randn(2, 3, 4, 5, dtype=D64, requires_grad=True)
    copy = x.clone().requires_grad_() * 1.0  # the same values, another storage

    def attend() -> torch.Tensor:
        with fn.recomputing([(copy, x, None)]):
            return torch.matmul(copy, w)  # keeps w and a view of copy

    out, saved = _saved_storages(attend)
    assert set(saved) == {w.untyped_storage().data_ptr()}
    out.sum().backward(retain_graph=True)
    assert torch.equal(w.grad, torch.matmul(x.transpose(-1, -2), torch.ones_like(out)))
    with torch.no_grad():
        x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
