"""The attention methods registry (methods/): each rule's tau at known positions, identity starts,
gradients into the new parameters, parameter counts, optimizer groups, and save / reload."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.methods import (
    METHODS,
    FrequencyTemperature,
    HeadGate,
    Llama4Temperature,
    ScalableSoftmaxTemperature,
    YarnTemperature,
    apply_method,
    frequency_table,
    get_method,
    load_model,
    parameter_counts,
)
from selective_attention.train import TrainConfig, train
from selective_attention.train.models import build_model
from selective_attention.train.optim import OptimConfig, build_optimizer, lr_factor

VOCAB, T = 300, 24  # tiny Llama: 2 layers, d_model 128, 4 heads


def tiny(method: str = "vanilla", **kw):
    model = build_model("tiny", VOCAB, T, "vanilla", None, seed=0)
    applied = apply_method(model, method, seq_len=T, **kw)
    return model, applied


def ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


# ---- the rules' tau at known positions


POS = torch.tensor([[1, 2, 3, 4, 7, 8, 12, 100]])  # 1-indexed


def test_yarn_tau():
    tau = YarnTemperature(3, coefficient=0.1)(positions=POS)
    assert tau.shape == (1, 3, 8)
    expected = torch.tensor([1.0, 1.0693147, 1.1098612, 1.1386294, 1.1945910, 1.2079442, 1.2484907, 1.4605170])
    torch.testing.assert_close(tau[0, 2], expected, atol=1e-6, rtol=0)


def test_llama4_tau():
    tau = Llama4Temperature(2, beta=0.1, floor_scale=4)(positions=POS)
    # floor(p / 4) = 0 0 0 1 1 2 3 25  ->  1 + 0.1 ln(1 + that)
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0693147, 1.0693147, 1.1098612, 1.1386294, 1.3258097])
    torch.testing.assert_close(tau[0, 1], expected, atol=1e-6, rtol=0)
    assert Llama4Temperature(1, floor_scale=8192)(positions=POS).eq(1.0).all()  # Llama 4's own scale: off here
    assert get_method("llama4").options_for(256)["floor_scale"] == 16  # the default scales with seq_len
    assert get_method("llama4").options_for(256, {"floor_scale": 8192})["floor_scale"] == 8192


def test_ssmax_tau():
    fn = ScalableSoftmaxTemperature(2, seq_len=64)
    assert torch.equal(fn.s.detach(), torch.full((2,), 1 / math.log(64)))
    tau = fn(positions=POS)
    torch.testing.assert_close(tau[0, 0], torch.log(POS[0].float()) / math.log(64), atol=1e-6, rtol=0)
    assert tau[0, 0, 0] == 0  # p = 1: one visible key


def test_freq_tau_and_table():
    tokens = np.array([0] * 60 + [1] * 30 + [2] * 9 + [3])  # token 4 never occurs
    table = frequency_table(tokens, vocab=5, lo=0.25, hi=4.0)
    assert table.shape == (5,)
    assert table[0] < table[1] < table[2] < table[3] <= table[4] <= 4.0  # rarer -> sharper
    assert table.min() >= 0.25
    fn = FrequencyTemperature(2, table)
    fn.input_ids = torch.tensor([[4, 0, 2]])
    assert torch.equal(fn(positions=torch.arange(1, 4))[0, 1], table[[4, 0, 2]])


# ---- methods on a model


def test_identity_rules_reproduce_vanilla_exactly():
    """const (tau = 1 at init) and llama4 with a floor_scale beyond the sequence leave the function unchanged."""
    x = ids()
    with torch.no_grad():
        ref = tiny()[0](input_ids=x).logits
        for method, opts in (("const", {}), ("llama4", {"floor_scale": 10_000}), ("gated", {})):
            out = tiny(method, options=opts)[0](input_ids=x).logits
            assert torch.equal(out, ref), method
        # ... and a rule that is not the identity changes it
        assert not torch.allclose(tiny("yarn")[0](input_ids=x).logits, ref, atol=1e-4)


def test_gated_init_is_identity_and_gradient_reaches_the_gates():
    model, applied = tiny("gated")
    gates = [m for m in model.modules() if isinstance(m, HeadGate)]
    assert len(gates) == 2 and all(torch.equal(g.proj.weight, torch.zeros(4, 128)) for g in gates)
    x = ids()
    model(input_ids=x).logits.float().logsumexp(-1).mean().backward()
    for g in gates:
        assert g.proj.weight.grad is not None and g.proj.weight.grad.abs().sum() > 0
    # the gate multiplies each head's output: a closed gate on layer 0 changes the logits
    with torch.no_grad():
        ref = model(input_ids=x).logits
        gates[0].proj.weight.fill_(-100.0)
        assert not torch.allclose(model(input_ids=x).logits, ref, atol=1e-3)
    assert [k for k in model.state_dict() if "attn_gate" in k] == [
        "model.layers.0.self_attn.attn_gate.proj.weight",
        "model.layers.1.self_attn.attn_gate.proj.weight",
    ]


def test_gated_refuses_a_model_without_o_proj():
    model = build_model("gpt2-124m", 64, 16, "vanilla", None, seed=0)
    with pytest.raises(UserError, match="o_proj"):
        apply_method(model, "gated", seq_len=16)


@pytest.mark.parametrize(
    "method,new",
    [
        ("vanilla", 0),
        ("ssa-pos-head", 2 * 4),
        ("ssa-official", 2),
        ("const", 2 * 4),
        ("yarn", 0),
        ("ssmax", 2 * 4),
        ("llama4", 0),
        ("gated", 2 * 128 * 4),
    ],
)
def test_parameter_counts(method, new):
    model, applied = tiny(method)
    counts = parameter_counts(model, applied)
    vanilla_total = sum(p.numel() for p in tiny()[0].parameters())
    assert counts["new"] == new and counts["total"] == vanilla_total + new and counts["base"] == vanilla_total


@pytest.mark.parametrize("name", ["ssa-pos-head", "ssa-pos"])  # ssa-pos: the older name, still accepted
def test_ssa_pos_head_is_position_only_on_the_query(name):
    model, applied = tiny(name, ssa=SSAConfig(init="scratch"))
    assert model.config.ssa["token_aware"] is False and model.config.ssa["value"] is False
    assert all(p.shape == (4,) for p in applied.new_parameters)  # c per head
    assert not hasattr(model.config, "ssa_method")  # an SSA model: from_pretrained reloads it


def test_official_form_is_one_coefficient_per_layer():
    from selective_attention.methods import OfficialPositionTemperature

    model, applied = tiny("ssa-official")
    fns = [m for m in model.modules() if isinstance(m, OfficialPositionTemperature)]
    assert len(fns) == 2 and all(p.shape == (1,) for p in applied.temperature_parameters)
    assert applied.temperature_parameters == applied.new_parameters
    fn = fns[0]
    c = math.exp(-math.exp(2.0))  # 6.2e-4
    p = torch.arange(1, 9)
    expected = (1 + c * torch.log(p.double())).float().expand(1, 4, 8)
    torch.testing.assert_close(fn(positions=p), expected, atol=1e-7, rtol=0)
    with torch.no_grad():
        fn.beta.fill_(0.0)  # c = exp(-1)
    torch.testing.assert_close(fn(positions=p)[0, 2], 1 + math.exp(-1) * torch.log(p.float()), atol=1e-6, rtol=0)
    fn(positions=p).sum().backward()
    assert fn.beta.grad is not None and fn.beta.grad.abs().item() > 0


def test_optimizer_groups_per_method():
    opt = OptimConfig(lr=1e-3, temperature_lr=5e-2, weight_decay=0.1)
    model, applied = tiny("const")
    groups = {g["name"]: g for g in build_optimizer(model, opt, "cpu", applied.temperature_parameters).param_groups}
    temp = groups["temperature"]
    assert temp["lr"] == 5e-2 and temp["weight_decay"] == 0.0
    assert {id(p) for p in temp["params"]} == {id(p) for p in applied.new_parameters}
    model, applied = tiny("gated")  # the gates are ordinary weights: base lr, decayed
    groups = {g["name"]: g for g in build_optimizer(model, opt, "cpu", applied.temperature_parameters).param_groups}
    assert "temperature" not in groups
    assert {id(p) for p in applied.new_parameters} <= {id(p) for p in groups["decay"]["params"]}


def test_unknown_method_and_option():
    with pytest.raises(UserError, match="unknown attention method"):
        get_method("sparse")
    with pytest.raises(UserError, match="unknown option"):
        TrainConfig(attention="llama4", method_options={"alpha": 1}).validate()
    with pytest.raises(UserError, match="must be a number"):
        TrainConfig(attention="yarn", method_options={"coefficient": "big"}).validate()
    TrainConfig(attention="llama4", method_options={"beta": 0.2, "floor_scale": 8}).validate()
    assert set(METHODS) == {
        "vanilla",
        "ssa",
        "ssa-pos-head",
        "ssa-official",
        "const",
        "yarn",
        "ssmax",
        "freq",
        "llama4",
        "gated",
    }


@pytest.mark.parametrize("method", ["gated", "ssmax", "freq", "llama4", "ssa-official", "const", "yarn"])
def test_saved_model_reloads_through_load_model(method, tmp_path):
    train_tokens = np.random.default_rng(0).integers(0, VOCAB, 5000)
    model, applied = tiny(
        method, options={"floor_scale": 3} if method == "llama4" else None, train_tokens=train_tokens, vocab=VOCAB
    )
    with torch.no_grad():  # move the new parameters away from their init
        for p in applied.new_parameters:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.3)
    model.eval()
    x = ids()
    with torch.no_grad():
        ref = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "m")
    saved_cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved_cfg["ssa_method"]["name"] == method
    again = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=x).logits, ref)
    # the SSA loader would drop the method's modules (silently for gated): it refuses and names the right loader
    from selective_attention.hf import from_pretrained

    with pytest.raises(UserError, match="methods.load_model"):
        from_pretrained(tmp_path / "m")


def test_load_model_names_a_garbled_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(UserError, match=r"config\.json \(a Hugging Face model's config\) is not valid JSON"):
        load_model(tmp_path / "m")


# ---- through train()


@pytest.mark.parametrize("method", ["gated", "llama4"])
def test_train_with_a_method_and_reload(method, corpus, tmp_path):
    cfg = TrainConfig(
        data=str(corpus),
        size="tiny",
        vocab_size=300,
        seq_len=32,
        batch_size=4,
        max_tokens=256,
        eval_every=0,
        eval_tokens=128,
        out=str(tmp_path / method),
        progress=False,
        cache_dir=str(tmp_path.parent / "ssa-cache"),
        warmup=1,
        attention=method,
    )
    run = train(cfg)
    assert math.isfinite(run["final_val_loss"])
    assert run["parameters"]["new"] == {"gated": 2 * 128 * 4, "llama4": 0}[method]
    assert run["config"]["method"]["name"] == method and run["config"]["ssa"] is None
    # every method's saved model evaluates with `ssa eval` (the registry rebuilds its modules)
    from selective_attention.cli import main

    out = tmp_path / f"{method}-eval.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / method / "final"),
                "--data",
                str(corpus),
                "--tasks",
                "perplexity",
                "--seq-len",
                "32",
                "--limit",
                "4",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    ppl = json.loads(out.read_text())["perplexity"]["token_ppl"]
    assert math.isfinite(ppl) and 1.0 < ppl < 1000
    if method == "llama4":
        assert run["config"]["method"]["options"]["floor_scale"] == 2  # seq_len 32 // 16
        assert run["temperatures"]["modules"] == [] and run["temperatures"]["moved"] is None  # nothing to learn


@pytest.mark.parametrize("method,ssa", [("ssa", SSAConfig(init="identity")), ("ssa-official", None)])
def test_run_records_where_the_temperatures_ended(method, ssa, corpus, tmp_path):
    # 8 steps at temperature lr 5e-2: c can move up to position_scale x sum of the rates
    cfg = TrainConfig(
        data=str(corpus),
        size="tiny",
        vocab_size=300,
        seq_len=32,
        batch_size=4,
        max_tokens=1024,
        eval_every=0,
        eval_tokens=128,
        out=str(tmp_path / method),
        progress=False,
        temperature_lr=5e-2,
        cache_dir=str(tmp_path.parent / "ssa-cache"),
        warmup=1,
        attention=method,
        ssa=ssa,
    )
    run = train(cfg)
    rec = run["temperatures"]
    factors = [lr_factor(s, 8, 1, cfg.min_lr_ratio) for s in range(8)]
    assert rec["lr"] == 5e-2 and rec["lr_sum"] == pytest.approx(5e-2 * sum(factors))
    mods = rec["modules"]
    if method == "ssa":
        query = [m for m in mods if m["target"] == "query"]
        assert len(query) == 2 and all(len(m["c"]) == 4 and m["c_start"] == 0.0 for m in query)
        assert all(m["c_reach"] == pytest.approx(10 * rec["lr_sum"]) for m in query)
        assert set(rec["token_spread"]) == {"query", "value"} and len(rec["token_spread"]["query"]) == 2
        assert max(rec["token_spread"]["query"]) > 0  # the token term varies over tokens after training
    else:
        # the official form: beta moves at most lr_sum from 2.0, so c can reach exp(-exp(2 - lr_sum)) from e^-e^2
        assert len(mods) == 2 and all(len(m["c"]) == 1 for m in mods)
        c0 = math.exp(-math.exp(2.0))
        assert all(m["c_start"] == pytest.approx(c0, rel=1e-6) for m in mods)
        assert all(m["c_reach"] == pytest.approx(math.exp(-math.exp(2.0 - rec["lr_sum"])) - c0) for m in mods)
        assert all(abs(m["c"][0] - c0) <= m["c_reach"] for m in mods)  # the bound holds
    assert rec["moved"] and all(p["moved"] for m in mods for p in m["params"].values())
    # the record matches the saved model
    model = load_model(tmp_path / method / "final")
    fn = dict(model.named_modules())[mods[0]["name"]]
    assert [round(float(v), 6) for v in fn.position_coefficient().detach()] == mods[0]["c"]
    from selective_attention.data.tokens import prepare
    from selective_attention.train.loss import evaluate_loss

    model = load_model(tmp_path / method / "final")
    val = prepare(cfg.data, "bpe", 300, cache_dir=cfg.cache_dir).tokens("val")
    assert evaluate_loss(model, val, 32, 4, 128) == pytest.approx(run["final_val_loss"], abs=1e-5)
