"""torch.compile(fullgraph=True) of the fused op and the standalone layer: one graph, forward and backward
equal to eager. aot_eager captures the graph and runs it with eager kernels (fast); inductor is marked slow."""

import pytest
import torch

from selective_attention import KVCache, SelectiveSelfAttention, SSAConfig, selective_attention, temperature_parameters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    out.pow(2).sum().backward()
    return out, [t.grad for t in inputs if t.requires_grad]


@pytest.mark.parametrize("H,Hkv,Tq,Tk", [(4, 4, 6, 6), (4, 2, 6, 6), (4, 2, 3, 7), (4, 1, 1, 7)])
def test_fused_op_fullgraph(H, Hkv, Tq, Tk):
    # causal self-attention, GQA, chunked and single-token cached decoding (k, v of a cache: no grad)
    g = torch.Generator().manual_seed(0)
    cached = Tq < Tk
    q = torch.randn(2, H, Tq, 8, generator=g, requires_grad=True)
    k = torch.randn(2, Hkv, Tk, 8, generator=g, requires_grad=not cached)
    v = torch.randn(2, Hkv, Tk, 8, generator=g, requires_grad=not cached)
    tau_q = (0.5 + torch.rand(2, H, Tq, generator=g)).requires_grad_()
    tau_v = (0.5 + torch.rand(2, Hkv, Tk, generator=g)).requires_grad_(not cached)
    tau_k = (0.5 + torch.rand(2, Hkv, Tk, generator=g)).requires_grad_(not cached)
    inputs = [q, k, v, tau_q, tau_v, tau_k]
    compiled = torch.compile(selective_attention, fullgraph=True, backend="aot_eager", dynamic=False)
    out, grads = _grads(compiled, inputs)
    ref, ref_grads = _grads(selective_attention, inputs)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _layer(sharing: str, seed: int = 0) -> SelectiveSelfAttention:
    torch.manual_seed(seed)
    layer = SelectiveSelfAttention(32, 4, 2, SSAConfig(sharing=sharing, key=True, init="scratch"), rope=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # moved temperatures, c in the range a trained model has (|c| < ~1, not 10 x randn)
        for name, p in layer.named_parameters():
            if name.endswith("coefficient"):
                p.copy_(torch.randn(p.shape, generator=g).abs() * 0.5 / layer.config.position_scale)
            elif any(p is t for t in temperature_parameters(layer)):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return layer


def _check_layer(layer: SelectiveSelfAttention, backend: str, exact: bool, cache: bool) -> None:
    x = torch.randn(2, 7, 32)
    compiled = torch.compile(layer, fullgraph=True, backend=backend, dynamic=False)
    out = compiled(x)
    out.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    ref = layer(x)
    ref.pow(2).sum().backward()
    if exact:
        assert torch.equal(out, ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)
    if cache:  # decoding with a cache in the compiled module too (two more graphs)
        with torch.no_grad():
            kv = KVCache()
            steps = torch.cat([compiled(x[:, :4], cache=kv), compiled(x[:, 4:], cache=kv)], dim=1)
        torch.testing.assert_close(steps, ref.detach(), atol=1e-5, rtol=1e-5)


def test_layer_fullgraph_aot_eager():
    _check_layer(_layer("shared"), "aot_eager", exact=True, cache=False)


@pytest.mark.slow
def test_layer_fullgraph_aot_eager_mlp_and_cache():
    _check_layer(_layer("mlp"), "aot_eager", exact=True, cache=True)


def test_layer_fullgraph_under_bf16_autocast_keeps_float32_temperatures():
    layer = _layer("shared")
    x = torch.randn(2, 7, 32)
    compiled = torch.compile(layer.temperatures, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        taus = compiled(x)
        ref = layer.temperatures(x)
    for t in ("query", "key", "value"):
        assert taus[t].dtype == torch.float32 and torch.equal(taus[t], ref[t]), t


@pytest.mark.slow
@pytest.mark.parametrize("sharing", ["shared", "mlp"])
def test_layer_fullgraph_inductor(sharing):
    _check_layer(_layer(sharing), "inductor", exact=False, cache=True)
