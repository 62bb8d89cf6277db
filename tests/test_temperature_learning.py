"""Known-answer tests: the temperatures can learn a teacher's values at the library's default settings.

Under Adam a parameter moves by about its learning rate per step whatever its gradient, so the parameterisation
decides which values are reachable in a run at all. The older c = sigmoid(alpha) learned c <= 0.041 on every head
of the teacher below from the identity start (alpha = -4) and stayed >= 0.28 from the scratch start (alpha = 0).
"""

import copy

import pytest
import torch

from selective_attention import SelectiveSelfAttention, SSAConfig, param_groups, temperature_parameters
from selective_attention.temperature import TemperatureFunction, legacy_alpha_to_coefficient

TEACHER_C = torch.tensor([0.02, 0.1, 0.3, 0.6])
D_MODEL, HEADS, T = 32, 4, 64


def _fit(student: SelectiveSelfAttention, teacher: SelectiveSelfAttention, steps: int, seed: int = 0) -> None:
    """Fit the student's temperatures (base weights frozen) to the teacher's outputs with AdamW at lr 1e-3."""
    for p in student.parameters():
        p.requires_grad_(False)
    for p in temperature_parameters(student):
        p.requires_grad_(True)
    opt = torch.optim.AdamW(param_groups(student, lr=1e-3), betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, T, D_MODEL, generator=g)
        with torch.no_grad():
            target = teacher(x)
        loss = (student(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _position_pair(start: float | None, init: str) -> tuple[SelectiveSelfAttention, SelectiveSelfAttention]:
    torch.manual_seed(0)
    cfg = SSAConfig(token_aware=False, value=False, init=init, position_init=start)
    student = SelectiveSelfAttention(D_MODEL, HEADS, config=cfg)
    with torch.no_grad():  # sharper queries than the default init, so that the temperature matters for the output
        student.q_proj.weight.mul_(3.0)
        student.k_proj.weight.mul_(3.0)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.temperature.fns["query"].coefficient.copy_(TEACHER_C / cfg.position_scale)
    return student, teacher


@pytest.mark.parametrize("init,start", [("identity", None), ("scratch", None), ("identity", 0.01)])
def test_position_coefficient_reaches_a_known_teacher(init, start):
    student, teacher = _position_pair(start, init)
    c0 = student.temperature.fns["query"].position_coefficient().detach()
    torch.testing.assert_close(c0, torch.full((HEADS,), student.config.start_coefficient), atol=1e-7, rtol=0)
    _fit(student, teacher, steps=1000)
    learned = student.temperature.fns["query"].position_coefficient().detach()
    assert (learned - TEACHER_C).abs().max() < 0.03, learned


def test_token_readout_reaches_a_known_teacher():
    # Teacher: a query token term with a known read-out u (f ~ +-1.5 over tokens), no position term.
    torch.manual_seed(1)
    cfg = SSAConfig(position_aware=False, value=False)
    student = SelectiveSelfAttention(D_MODEL, HEADS, config=cfg)
    with torch.no_grad():
        student.q_proj.weight.mul_(3.0)
        student.k_proj.weight.mul_(3.0)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.temperature.fns["query"].readout.copy_(torch.randn(HEADS, D_MODEL // HEADS) * 0.6)
    _fit(student, teacher, steps=1000)
    x = torch.randn(4, T, D_MODEL, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        tau_s = student.temperatures(x)["query"]
        tau_t = teacher.temperatures(x)["query"]
    start_error = (tau_t - 1).abs().mean()  # the student starts at tau = 1
    assert tau_t.std() > 0.3 and start_error > 0.3  # the teacher's temperature really varies over tokens
    assert (tau_s - tau_t).abs().mean() < 0.1 * start_error, ((tau_s - tau_t).abs().mean(), start_error)


def test_identity_start_is_exact_with_live_gradient():
    fn = TemperatureFunction(4, 8, 32, SSAConfig(token_aware=False, value=False))
    assert torch.equal(fn.position_coefficient(), torch.zeros(4))
    tau = fn(positions=torch.arange(1, 65))
    assert torch.equal(tau, torch.ones_like(tau))
    tau.sum().backward()
    # dL/dtheta = position_scale * sum_p log p per head
    expected = 10.0 * torch.log(torch.arange(1, 65).double()).sum().float()
    torch.testing.assert_close(fn.coefficient.grad, expected.expand(4), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "init,alpha,c",
    [
        ("identity", -4.0, 0.0),
        ("identity", -2.0, 0.119202922 - 0.017986210),
        ("scratch", 0.0, 0.5),
        ("scratch", -1.0, 0.268941421),
    ],
)
def test_older_sigmoid_models_load_as_the_same_c(init, alpha, c):
    cfg = SSAConfig.from_dict(
        {"init": init, "identity_alpha": -4.0, "scratch_alpha": 0.0, "token_aware": False, "value": False}
    )
    fn = TemperatureFunction(3, 4, 12, cfg)
    fn.load_state_dict({"alpha": torch.full((3,), alpha)})
    torch.testing.assert_close(fn.position_coefficient(), torch.full((3,), c), atol=1e-7, rtol=0)
    state = {"model.layers.0.self_attn.ssa_temperature.fns.query.alpha": torch.full((3,), alpha)}
    legacy_alpha_to_coefficient(state, init == "identity", cfg.position_scale)
    assert list(state) == ["model.layers.0.self_attn.ssa_temperature.fns.query.coefficient"]


def test_older_scratch_alpha_maps_to_the_start_c():
    cfg = SSAConfig.from_dict({"init": "scratch", "scratch_alpha": 1.0, "identity_alpha": -4.0})
    assert cfg.start_coefficient == pytest.approx(0.7310585786)
    with pytest.raises(ValueError, match="cannot be mapped"):
        SSAConfig.from_dict({"identity_alpha": -3.0})
