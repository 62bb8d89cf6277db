"""convert() on tiny random GPT-2, GPT-NeoX and Llama (GQA) models: identity, gradients, generation, caching,
left padding, eager vs SDPA, unsupported models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from selective_attention import SSAConfig
from selective_attention.hf import convert, model_temperatures
from selective_attention.temperature import temperature_parameters

CONFIGS = {
    "shared": SSAConfig(),
    "mlp": SSAConfig(sharing="mlp", mlp_hidden=8),
    "qkv": SSAConfig(key=True),
}


@pytest.mark.parametrize("cfg", ["shared", "mlp"])
def test_identity_at_init(family: str, cfg: str, tiny, ids, randomise_temperatures) -> None:
    model = tiny(family)
    x = ids()
    with torch.no_grad():
        ref = model(x).logits
    convert(model, CONFIGS[cfg])
    assert model.config._attn_implementation == "ssa"
    assert model.config.ssa["sharing"] == CONFIGS[cfg].sharing
    with torch.no_grad():
        out = model(x).logits
    assert torch.equal(out, ref)  # bit-exact: every temperature is exactly 1 and the fused join is a copy
    # the temperatures really are in the graph: randomising them changes the output
    randomise_temperatures(model)
    with torch.no_grad():
        assert (model(x).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", ["shared", "mlp", "qkv"])
def test_every_temperature_parameter_gets_a_gradient(family: str, cfg: str, tiny, ids) -> None:
    model = convert(tiny(family), CONFIGS[cfg]).train()
    x = ids()
    loss = model(x, labels=x).loss
    loss.backward()
    params = temperature_parameters(model)
    n_layers = 2
    token = 3 if cfg == "mlp" else 1  # readout | fc_in.weight, fc_in.bias, fc_out.weight
    alphas = sum(t != "value" for t in CONFIGS[cfg].targets)  # the value takes no c log p term by default
    assert len(params) == n_layers * (len(CONFIGS[cfg].targets) * token + alphas)
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_cached_decoding_equals_full_forward(
    family: str, tiny, ids, randomise_temperatures, check_cached_decoding
) -> None:
    model = convert(tiny(family), CONFIGS["qkv" if family != "llama" else "shared"])
    randomise_temperatures(model)
    x = ids(B=2, T=12)
    with torch.no_grad():
        full = model(x).logits  # (B, T, V)
    check_cached_decoding(model, x, full)  # one token at a time: the position term must use absolute positions


def test_generate_scores_match_full_forward(family: str, tiny, ids, randomise_temperatures) -> None:
    model = convert(tiny(family), SSAConfig(sharing="mlp", mlp_hidden=8))
    randomise_temperatures(model)
    x = ids(B=1, T=6)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
        seq = out.sequences
        assert seq.shape == (1, 12)
        full = model(seq).logits
    for i, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[0, 5 + i], atol=1e-4, rtol=0)


def test_left_padded_batch_generates_like_each_alone(family: str, tiny, ids, randomise_temperatures) -> None:
    model = convert(tiny(family))
    randomise_temperatures(model, scale=1.0)
    prompts = [ids(1, 4, seed=5)[0], ids(1, 9, seed=6)[0]]
    T = max(len(p) for p in prompts)
    batch = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p) :] = p
        mask[i, T - len(p) :] = 1
    kw = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        together = model.generate(batch, attention_mask=mask, **kw)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
            assert torch.equal(together.sequences[i, T:], alone.sequences[0, len(p) :])
            for a, b in zip(together.logits, alone.logits):
                torch.testing.assert_close(a[i], b[0], atol=1e-4, rtol=0)


def test_eager_and_sdpa_backends_agree(family: str, tiny, ids, randomise_temperatures) -> None:
    base = tiny(family)
    sdpa = convert(copy.deepcopy(base), CONFIGS["qkv" if family != "llama" else "shared"], backend="sdpa")
    eager = convert(copy.deepcopy(base), CONFIGS["qkv" if family != "llama" else "shared"], backend="eager")
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("ssa", "ssa_eager")
    randomise_temperatures(sdpa)
    randomise_temperatures(eager)
    x = ids(B=2, T=8)
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        a, b = sdpa(x, attention_mask=mask).logits, eager(x, attention_mask=mask).logits
        torch.testing.assert_close(a[0, 3:], b[0, 3:], atol=1e-5, rtol=0)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
        # an eager model converted without naming a backend stays eager
        plain_eager = copy.deepcopy(base)
        plain_eager.set_attn_implementation("eager")
        assert convert(plain_eager).config._attn_implementation == "ssa_eager"


def test_deepcopy_of_a_converted_model_is_independent(tiny, ids, randomise_temperatures) -> None:
    model = convert(tiny("llama"))
    clone = copy.deepcopy(model)
    randomise_temperatures(clone)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, tiny("llama")(x).logits)
        assert (clone(x).logits - model(x).logits).abs().max() > 1e-3


def test_model_temperatures_shapes_and_padding(tiny, ids, randomise_temperatures) -> None:
    model = convert(tiny("llama"))  # GQA: value heads are repeated to the 4 query heads
    randomise_temperatures(model)
    x = ids(B=2, T=7)
    temps = model_temperatures(model, x)
    assert temps["query"].shape == (2, 2, 4, 7) and temps["value"].shape == (2, 2, 4, 7)
    assert temps["query"].dtype == torch.float32
    assert torch.equal(temps["value"][:, :, 0], temps["value"][:, :, 1])  # heads 0, 1 share kv head 0
    # a left-padded row reports the same temperatures as the unpadded sequence at the same tokens
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:1]], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    tp = model_temperatures(model, padded, mask)
    torch.testing.assert_close(tp["query"][0, 0, :, 3:], temps["query"][0, 0], atol=1e-5, rtol=0)
    # query-only SSA reports ones for the value
    q_only = convert(tiny("gpt2"), SSAConfig(value=False))
    assert torch.equal(model_temperatures(q_only, x)["value"], torch.ones(2, 2, 4, 7))


class MyOwnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)


def test_unsupported_model_raises_naming_its_class(tiny) -> None:
    with pytest.raises(ValueError, match="MyOwnNet"):
        convert(MyOwnNet())
    model = convert(tiny("gpt2"))
    with pytest.raises(ValueError, match="already converted"):
        convert(model)
    with pytest.raises(ValueError, match="backend"):
        convert(tiny("gpt2"), backend="flash")
