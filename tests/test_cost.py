"""What SSA's training step costs beyond vanilla's, and that the cheaper paths change no number (issue 23).

The recomputing paths - the token term's written-out backward (temperature._SharedTokenLogit) and the attention
kernel keeping (x, tau) instead of its scaled inputs (functional.recomputing, with the fused projection's aliases
and the reshaped copies of eager kernels) - must give the loss and every gradient of plain autograd through the
same formulas, bit for bit: studies resume on this code.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import selective_attention.functional as functional
import selective_attention.temperature as temperature
from selective_attention import SSAConfig, hf
from selective_attention.layer import SelectiveSelfAttention
from selective_attention.temperature import temperature_parameters
from selective_attention.train.models import build_model

STUDY_CONFIGS = {  # the LM study's rows (experiments/lm: method_settings) and a key temperature
    "ssa": SSAConfig(init="scratch"),
    "ssa-mlp": SSAConfig(sharing="mlp", init="scratch"),
    "ssa-c0.1": SSAConfig(init="identity", position_init=0.1),
    "ssa-pos": SSAConfig(init="identity", position_init=0.1, token_aware=False, value=False),
    "ssa-key": SSAConfig(init="scratch", key=True),
}


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():  # every temperature term away from its start, so that each one matters
        for p in temperature_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids[:, :-1], **kwargs).logits
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return [loss.detach(), logits.detach()] + [p.grad for p in model.parameters() if p.grad is not None]


def _assert_bit_identical(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), (i, (a.double() - b.double()).abs().max().item())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(STUDY_CONFIGS))
def test_study_model_gradients_equal_plain_autograd_bit_for_bit(name, attn):
    # the study's model (size "study", its vocabulary, float32), a shorter window
    model = build_model("study", 2048, 64, "ssa", STUDY_CONFIGS[name], seed=0).train()
    model.set_attn_implementation(attn)
    _perturb(model)
    ids = torch.randint(0, 2048, (4, 65), generator=torch.Generator().manual_seed(0))
    got = _loss_and_grads(model, ids)
    with functional.keep_scaled_copies():  # plain autograd through the formulas, nothing recomputed
        ref = _loss_and_grads(model, ids)
    _assert_bit_identical(got, ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_fused_projection_gradients_equal_plain_autograd_bit_for_bit(attn, use_cache):
    # GPT-2's c_attn: the kernel keeps views of c_attn's output in place of the rejoined copy's
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, attn_implementation=attn, attn_pdrop=0.0
    )
    cfg.resid_pdrop = cfg.embd_pdrop = 0.0
    model = hf.convert(GPT2LMHeadModel(cfg), SSAConfig(init="scratch", key=True)).train()
    _perturb(model)
    ids = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(0))
    got = _loss_and_grads(model, ids, use_cache=use_cache)
    with functional.keep_scaled_copies():  # plain autograd through the formulas, nothing recomputed
        ref = _loss_and_grads(model, ids, use_cache=use_cache)
    _assert_bit_identical(got, ref)


@pytest.mark.parametrize("n_kv", [4, 2])
def test_layer_gradients_equal_plain_autograd_bit_for_bit(n_kv):
    torch.manual_seed(0)
    layer = SelectiveSelfAttention(64, 4, n_kv, config=SSAConfig(init="scratch", key=True), rope=True)
    _perturb(layer)
    x = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(1))

    def run() -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.pow(2).mean().backward()
        return [y.detach(), xi.grad] + [p.grad for p in layer.parameters()]

    got = run()
    with functional.keep_scaled_copies():  # plain autograd through the formulas, nothing recomputed
        ref = run()
    _assert_bit_identical(got, ref)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_token_term_backward_replays_nothing_it_does_not_need():
    # forward: gelu, the read-out's bmm; backward: gelu recomputed (its output is not kept), gelu_backward, the
    # read-out's gradient bmm - and no second forward bmm nor a bmm of contraction length 1 (checkpoint ran 4)
    fn = temperature.TemperatureFunction(6, 32, 192, SSAConfig(position_aware=False))
    projection = torch.randn(4, 16, 6, 32).transpose(1, 2).requires_grad_()
    with _CountOps() as counted:
        fn(projection=projection).sum().backward()
    assert (counted.ops["gelu"], counted.ops["gelu_backward"], counted.ops["bmm"]) == (2, 1, 2), counted.ops


def test_keep_scaled_copies_is_a_scoped_switch():
    """The reference path of the tests above: on inside the context only, off again after an error in it."""
    assert functional.recomputation_enabled()
    with pytest.raises(RuntimeError), functional.keep_scaled_copies():
        assert not functional.recomputation_enabled()
        raise RuntimeError
    assert functional.recomputation_enabled()


def test_keep_scaled_copies_keeps_what_recomputation_saves():
    """So that the equalities above compare two different paths: after a forward inside the context, the graph
    holds the scaled copies and the token term's intermediates (more live bytes) and backward replays nothing."""
    from selective_attention.utils.memory import peak_memory_bytes

    torch.manual_seed(0)
    layer = SelectiveSelfAttention(64, 4, config=SSAConfig(init="scratch"))
    x = torch.randn(2, 48, 64, requires_grad=True)
    graphs: list[torch.Tensor] = []

    def forward() -> None:
        graphs.append(layer(x))  # the output keeps its graph (and what it saved) alive

    recomputing = peak_memory_bytes(forward, torch.device("cpu"))
    with functional.keep_scaled_copies():
        keeping = peak_memory_bytes(forward, torch.device("cpu"))
    scaled = 2 * x.numel() * 4  # tau * q and tau * v: (B, H, T, hs) in float32 each
    assert keeping - recomputing >= scaled
