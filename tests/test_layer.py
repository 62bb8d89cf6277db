"""The standalone layer: identity at init, gradients, KV-cache parity, bf16 at long positions, errors."""

import pytest
import torch

from selective_attention import KVCache, SelectiveSelfAttention, SSAConfig, temperature_parameters
from selective_attention.functional import reference_attention
from selective_attention.layer import apply_rope


def _randomise(layer: SelectiveSelfAttention, seed: int = 0) -> None:
    """Non-trivial temperatures: random read-outs / MLP outputs and position coefficients."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in temperature_parameters(layer):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _vanilla(layer: SelectiveSelfAttention, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    q = layer._split(layer.q_proj(x), layer.n_heads)
    k = layer._split(layer.k_proj(x), layer.n_kv_heads)
    v = layer._split(layer.v_proj(x), layer.n_kv_heads)
    if layer.rope:
        pos = torch.arange(T)
        q, k = apply_rope(q, pos, layer.rope_base), apply_rope(k, pos, layer.rope_base)
    y = reference_attention(q, k, v)
    return layer.o_proj(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("sharing", ["shared", "mlp"])
@pytest.mark.parametrize("key", [False, True])
def test_identity_at_init_and_gradients(sharing, key):
    torch.manual_seed(0)
    layer = SelectiveSelfAttention(32, 4, 2, SSAConfig(sharing=sharing, key=key), rope=True)
    x = torch.randn(2, 7, 32)
    out = layer(x)
    torch.testing.assert_close(out, _vanilla(layer, x), atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    temps = dict(layer.temperature.named_parameters())
    token_params = 1 if sharing == "shared" else 3  # readout | fc_in.weight, fc_in.bias, fc_out.weight
    n_targets = 3 if key else 2
    n_position = n_targets - 1  # alpha on query (and key); the value takes no c log p term by default
    assert len(temps) == n_targets * token_params + n_position
    for name, p in temps.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("sharing", ["shared", "mlp"])
@pytest.mark.parametrize("n_kv", [4, 1])
def test_cache_decoding_equals_full_forward(sharing, n_kv):
    torch.manual_seed(1)
    layer = SelectiveSelfAttention(32, 4, n_kv, SSAConfig(sharing=sharing, key=True), rope=True).eval()
    _randomise(layer)
    x = torch.randn(2, 9, 32)
    full = layer(x)
    taus = layer.temperatures(x)
    assert not torch.allclose(taus["query"], torch.ones_like(taus["query"]), atol=1e-2)
    cache = KVCache()
    steps = torch.cat([layer(x[:, i : i + 1], cache=cache) for i in range(9)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    cache = KVCache()
    chunks = torch.cat([layer(x[:, :4], cache=cache), layer(x[:, 4:], cache=cache)], dim=1)
    torch.testing.assert_close(chunks, full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9


def test_position_term_uses_absolute_positions():
    # A token decoded after 99 cached tokens must see log(100), not log(1) (the public code's bug).
    layer = SelectiveSelfAttention(16, 2, config=SSAConfig(token_aware=False, value=False, init="scratch"))
    x = torch.randn(1, 100, 16)
    taus = layer.temperatures(x)["query"]
    torch.testing.assert_close(taus[0, :, -1], torch.full((2,), 1 + 0.5 * torch.log(torch.tensor(100.0)).item()))
    explicit = layer.temperatures(x[:, -1:], positions=torch.tensor([100]))["query"]
    torch.testing.assert_close(explicit[0, :, 0], taus[0, :, -1])


def test_matches_reference_formula():
    # out_i = sum_j softmax_j(s <tau_q q_i, tau_k k_j>) tau_v v_j with the layer's own temperatures.
    torch.manual_seed(2)
    layer = SelectiveSelfAttention(24, 3, config=SSAConfig(key=True))
    _randomise(layer, 3)
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    layer = layer.double()
    B, T, _ = x.shape
    q, k, v = (layer._split(p(x), 3) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    t = layer.temperatures(x)
    y = reference_attention(q, k, v, t["query"], t["value"], t["key"])
    expected = layer.o_proj(y.transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(layer(x), expected, atol=1e-10, rtol=1e-10)


def test_bf16_finite_at_long_positions():
    torch.manual_seed(3)
    layer = SelectiveSelfAttention(64, 4, config=SSAConfig(init="scratch"), rope=True)
    _randomise(layer)
    layer = layer.to(torch.bfloat16)
    x = torch.randn(1, 16, 64, dtype=torch.bfloat16)
    positions = torch.arange(32768 - 15, 32769)
    out = layer(x, positions=positions)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    tau = layer.temperatures(x, positions)["query"]
    assert tau.dtype == torch.float32 and torch.isfinite(tau).all() and tau.max() > 2.0


def test_errors():
    with pytest.raises(ValueError, match="divisible"):
        SelectiveSelfAttention(30, 4)
    with pytest.raises(ValueError, match="multiple"):
        SelectiveSelfAttention(32, 4, 3)
    layer = SelectiveSelfAttention(32, 4)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="positions"):
        layer(torch.randn(2, 5, 32), positions=torch.arange(1, 4))
    with pytest.raises(ValueError, match="1-indexed"):
        layer(torch.randn(2, 5, 32), positions=torch.arange(0, 5))


@pytest.mark.parametrize("sharing", ["shared", "mlp"])
def test_bf16_autocast_temperatures_are_float32(sharing):
    # Forward and temperatures() under CPU bf16 autocast: every tau is the float32 computation on the
    # (autocast, bf16) projections, not a bf16 tensor (the value's used to be, in steps of 2^-7 around 1).
    torch.manual_seed(4)
    layer = SelectiveSelfAttention(32, 4, 2, SSAConfig(sharing=sharing, init="scratch", key=True), rope=True)
    _randomise(layer)
    x = torch.randn(2, 6, 32)
    seen: dict[str, torch.Tensor] = {}
    hook = layer.temperature.register_forward_hook(lambda m, args, out: seen.update({args[0]: out}) and None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    hook.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inspected = layer.temperatures(x)
        projections = {
            "query": layer._split(layer.q_proj(x), 4),
            "key": layer._split(layer.k_proj(x), 2),
            "value": layer._split(layer.v_proj(x), 2),
        }
    assert out.dtype == torch.bfloat16 and projections["value"].dtype == torch.bfloat16
    p = torch.arange(1, 7)
    for target, proj in projections.items():
        ref = layer.temperature(target, projection=proj.float(), hidden=x, positions=p)
        assert seen[target].dtype == torch.float32 and inspected[target].dtype == torch.float32, target
        assert torch.equal(seen[target], ref), target
        heads = ref.expand(2, -1, 6).repeat_interleave(4 // ref.shape[1], dim=1)
        assert torch.equal(inspected[target], heads), target
