"""The temperature functions: formulas, identity at init, gradients, parameter groups, config validation."""

import math

import pytest
import torch

from selective_attention import SSAConfig, param_groups, temperature_parameters
from selective_attention.temperature import (
    SSATemperatures,
    TemperatureFunction,
    _shared_token_logit,
    _shared_token_term,
    default_mlp_hidden,
)


def _fn(**cfg):
    return TemperatureFunction(n_heads=3, head_dim=4, d_model=12, config=SSAConfig(**cfg))


def test_position_term_formula():
    fn = _fn(token_aware=False, value=False, position_init=0.3)
    p = torch.arange(1, 9)
    tau = fn(positions=p)
    expected = 1 + 0.3 * torch.log(p.float())
    torch.testing.assert_close(tau, expected.expand(1, 3, 8), atol=1e-6, rtol=0)


def test_scratch_starts_sharper():
    fn = _fn(token_aware=False, value=False, init="scratch")
    torch.testing.assert_close(fn.position_coefficient(), torch.full((3,), 0.5))


def test_token_term_shared_known_values():
    # Head h reads only coordinate 0 of its projection, which is 1 there: f_h = u_h0 * gelu(1) = u_h0 * Phi(1).
    fn = _fn(position_aware=False)
    u = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        fn.readout.zero_()
        fn.readout[:, 0] = u
    proj = torch.zeros(2, 3, 5, 4)
    proj[..., 0] = 1.0
    proj[..., 1] = 3.0  # read with weight 0: must not matter
    phi_1 = 0.8413447460685429  # standard normal CDF at 1 = gelu(1)
    expected = (1 + torch.tanh(u * phi_1))[None, :, None].expand(2, 3, 5)
    torch.testing.assert_close(fn(projection=proj), expected, atol=1e-6, rtol=0)


def test_token_term_shared_per_head_and_gradient():
    # Against an independent per-head loop in float64; at u = 0 (identity init) tanh' = 1, so
    # dL/du_h = sum_{b,t} gelu(P_bht) * dL/dtau_bht.
    fn = _fn(position_aware=False).double()
    proj = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    grad_tau = torch.randn(2, 3, 5, dtype=torch.float64)
    (fn(projection=proj) * grad_tau).sum().backward()
    for h in range(3):
        expected = (torch.nn.functional.gelu(proj[:, h]) * grad_tau[:, h, :, None]).sum((0, 1))  # (D,)
        torch.testing.assert_close(fn.readout.grad[h], expected, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        fn.readout.normal_()
    tau = fn(projection=proj)
    for b in range(2):
        for h in range(3):
            for t in range(5):
                f = sum(torch.nn.functional.gelu(proj[b, h, t, d]) * fn.readout[h, d] for d in range(4))
                torch.testing.assert_close(tau[b, h, t], 1 + torch.tanh(f), atol=1e-12, rtol=0)


def test_token_term_ignores_position():
    # The same hidden state at two positions gets the same token term.
    fn = _fn(sharing="mlp", position_aware=False)
    x = torch.randn(1, 1, 12).expand(1, 4, 12)
    with torch.no_grad():
        fn.fc_out.weight.normal_()
    tau = fn(hidden=x)
    assert torch.allclose(tau, tau[..., :1].expand_as(tau))
    assert not torch.allclose(tau, torch.ones_like(tau))


@pytest.mark.parametrize("sharing", ["shared", "mlp"])
def test_identity_at_init_with_nonzero_gradients(sharing):
    fn = _fn(sharing=sharing)
    proj = torch.randn(2, 3, 6, 4)
    x = torch.randn(2, 6, 12)
    p = torch.arange(1, 7)
    tau = fn(projection=proj, hidden=x, positions=p)
    assert torch.equal(tau, torch.ones(2, 3, 6))
    (tau * torch.randn_like(tau)).sum().backward()
    params = list(fn.named_parameters())
    assert params
    for name, prm in params:
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


def test_identity_position_term_exactly_zero():
    fn = _fn(token_aware=False, value=False)
    assert torch.equal(fn.position_coefficient(), torch.zeros(3))
    assert torch.equal(fn(positions=torch.arange(1, 40000, 1000)), torch.ones(1, 3, 40))


def test_mlp_sized_for_growth():
    r = default_mlp_hidden(768, 12, 2, 0.05)
    added = 2 * (768 * r + r + r * 12)
    assert r % 2 == 0 and abs(added / (12 * 768 * 768) - 0.05) < 0.002


def test_separate_parameters_per_target():
    temps = SSATemperatures(12, 3, 1, 4, SSAConfig(key=True))
    assert set(temps.fns) == {"query", "key", "value"}
    assert temps.fns["query"].readout.shape == (3, 4) and temps.fns["value"].readout.shape == (1, 4)
    ids = [id(p) for fn in temps.fns.values() for p in fn.parameters()]
    assert len(ids) == len(set(ids))
    assert temps("key", projection=torch.randn(1, 1, 2, 4), positions=torch.arange(1, 3)).shape == (1, 1, 2)


def test_value_temperature_takes_the_position_term_only_on_request():
    # Default: tau_v = 1 + tanh(f(x)) (no log p growth of later tokens' values); opt in with value_position_aware.
    proj, p = torch.randn(2, 1, 5, 4), torch.arange(1, 6)
    default = SSATemperatures(12, 3, 1, 4, SSAConfig(init="scratch"))
    assert not hasattr(default.fns["value"], "coefficient") and hasattr(default.fns["query"], "coefficient")
    torch.testing.assert_close(default("value", projection=proj, positions=p), torch.ones(2, 1, 5))
    opted = SSATemperatures(12, 3, 1, 4, SSAConfig(init="scratch", value_position_aware=True))
    expected = (1 + 0.5 * torch.log(p.float())).expand(2, 1, 5)
    torch.testing.assert_close(opted("value", projection=proj, positions=p), expected, atol=1e-6, rtol=0)
    assert SSAConfig(token_aware=False, value_position_aware=True).targets == ("query", "value")


def test_param_groups_default_temperature_lr_is_the_base_rate():
    model = SSATemperatures(12, 3, 3, 4, SSAConfig())
    (group,) = param_groups(model, lr=3e-4)
    assert group["name"] == "temperature" and group["lr"] == 3e-4


def test_missing_inputs_raise():
    with pytest.raises(ValueError, match="positions"):
        _fn(token_aware=False, value=False)()
    with pytest.raises(ValueError, match="projection"):
        _fn(position_aware=False)()
    with pytest.raises(ValueError, match="does not match"):
        _fn(position_aware=False)(projection=torch.randn(1, 2, 3, 4))


def test_param_groups():
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), SSATemperatures(12, 3, 3, 4, SSAConfig()))
    groups = param_groups(model, lr=1e-3, temperature_lr=1e-2, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["temperature"]["lr"] == 1e-2 and by_name["temperature"]["weight_decay"] == 0.0
    assert {id(p) for p in by_name["temperature"]["params"]} == {id(p) for p in temperature_parameters(model)}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["decay"]["lr"] == 1e-3
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))
    only = param_groups(model, lr=1e-3, temperatures_only=True)
    assert len(only) == 1 and not model[0].weight.requires_grad
    torch.optim.AdamW(groups)  # accepted as-is


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sharing": "lora"}, "sharing"),
        ({"init": "zeros"}, "init"),
        ({"query": False, "value": False}, "at least one"),
        ({"token_aware": False, "position_aware": False}, "token_aware"),
        ({"token_aware": False}, "value temperature has no term"),
        ({"mlp_hidden": 3}, "even"),
        ({"mlp_growth": 2.0}, "mlp_growth"),
        ({"position_init": math.inf}, "finite"),
        ({"position_scale": 0.0}, "position_scale"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SSAConfig(**kwargs)


def test_config_round_trip():
    cfg = SSAConfig(key=True, sharing="mlp", mlp_hidden=8)
    assert SSAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        SSAConfig.from_dict({"bogus": 1})


def test_mlp_identity_exact_for_large_hidden_states():
    # Pretrained LLM hidden states reach magnitudes of tens: the mirrored halves must still cancel exactly.
    fn = TemperatureFunction(9, 64, 576, SSAConfig(sharing="mlp", position_aware=False))
    x = torch.randn(2, 50, 576) * 30
    assert torch.equal(fn(hidden=x), torch.ones(2, 9, 50))


def _random_temperatures(sharing: str, seed: int = 0) -> SSATemperatures:
    temps = SSATemperatures(12, 3, 1, 4, SSAConfig(sharing=sharing, init="scratch"), mlp_hidden=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in temps.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return temps


@pytest.mark.parametrize("sharing", ["shared", "mlp"])
@pytest.mark.parametrize("target,heads", [("query", 3), ("value", 1)])
def test_bf16_autocast_computes_temperatures_in_float32(sharing, target, heads):
    # Under autocast the projection arrives in bf16; tau must still be the float32 computation on it (autocast
    # used to run the einsum / linear in bf16, leaving the value's tau a bf16 tensor with steps of 2^-7).
    temps = _random_temperatures(sharing)
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(2, heads, 5, 4, generator=g).bfloat16()
    hidden = torch.randn(2, 5, 12, generator=g)
    p = torch.arange(1, 6)
    inputs = [proj.float().requires_grad_(), hidden.clone().requires_grad_()]
    ref = temps(target, projection=inputs[0], hidden=inputs[1], positions=p)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), [*inputs, *temps.parameters()], allow_unused=True)
    inputs = [proj.float().requires_grad_(), hidden.clone().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tau = temps(target, projection=inputs[0].bfloat16(), hidden=inputs[1], positions=p)
    grads = torch.autograd.grad(tau.pow(2).sum(), [*inputs, *temps.parameters()], allow_unused=True)
    assert tau.dtype == torch.float32
    assert torch.equal(tau, ref)
    if sharing == "shared":  # the projection's gradient passes its bf16 cast
        assert torch.equal(grads[0], ref_grads[0].bfloat16().float())
    for a, b in zip(grads[1:], ref_grads[1:]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_temperature_parameters_never_take_a_non_float_dtype():
    # A converted model's base weights may be integer / quantised / float8: the temperatures stay floating.
    temps = SSATemperatures(12, 3, 1, 4, SSAConfig(sharing="mlp"), mlp_hidden=8)
    x = torch.randn(2, 5, 12)
    for dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn):
        temps.to(device="cpu", dtype=dtype)
        temps.type(dtype)
        assert {p.dtype for p in temps.parameters()} == {torch.float32}, dtype
    assert torch.equal(temps("query", hidden=x, positions=torch.arange(1, 6)), torch.ones(2, 3, 5))
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), temps).to(torch.bfloat16)  # floating casts still apply
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert temps("value", hidden=x.bfloat16()).dtype == torch.float32


def _layout(t: torch.Tensor) -> list[int]:
    return [st for n, st in zip(t.shape, t.stride()) if n > 1]  # a size-1 dimension's stride is arbitrary


TOKEN_TERM_SHAPES = [
    (2, 3, 5, 4),
    (8, 6, 64, 32),
    (3, 5, 17, 2),
    (2, 1, 5, 4),
    (1, 3, 5, 4),
    (2, 3, 1, 4),
    (2, 3, 5, 1),
]


@pytest.mark.parametrize("shape", TOKEN_TERM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])  # a projection's head view, or a contiguous (B, H, T, D)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_shared_token_term_gradients_are_autograds_bit_for_bit(shape, layout, dtype):
    # The written-out backward (no replay of the read-out's forward) against autograd through the formula itself:
    # the same f and bit-identical gradients, in the same layout, for every input that needs one. Shapes with a
    # batch, length or head dim of 1 take the checkpointed formula (einsum orders its bmm differently there).
    B, H, T, D = shape
    g = torch.Generator().manual_seed(B * 1000 + T)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    base = torch.randn(B, T, H, D, generator=g) * 2
    proj = (base.transpose(1, 2) if layout == "bthd" else base.transpose(1, 2).contiguous()).to(dtype)
    readout = torch.randn(H, D, generator=g, dtype=wide)
    grad_tau = torch.randn(B, H, T, generator=g, dtype=wide)
    for needs in ((True, True), (True, False), (False, True)):
        results = []
        for term in (_shared_token_logit, _shared_token_term):
            p = proj.detach().clone(memory_format=torch.preserve_format).requires_grad_(needs[0])
            u = readout.clone().requires_grad_(needs[1])
            f = term(p, u)
            (torch.tanh(f) * grad_tau).sum().backward()
            results.append((f, p.grad, u.grad))
        for a, b in zip(*results):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b) and _layout(a) == _layout(b), (shape, layout, dtype, needs)


def test_shared_token_term_keeps_only_its_inputs():
    # What the token term saves for backward: the projection and the read-out, no (B, H, T, D) intermediate.
    proj = torch.randn(4, 10, 3, 8).transpose(1, 2).requires_grad_()
    readout = torch.randn(3, 8, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        f = _shared_token_term(proj, readout)
    assert {t.untyped_storage().data_ptr() for t in saved} == {
        proj.untyped_storage().data_ptr(),
        readout.untyped_storage().data_ptr(),
    }
    f.sum().backward()
    assert proj.grad is not None and readout.grad is not None
