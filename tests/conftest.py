import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# Tiny test models: one thread avoids oversubscription on small CI machines (a large speed-up when shared).
torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------------------
# Tiny Hugging Face models for the tests of selective_attention.hf, handed out as fixtures (the test modules
# never import each other).

HF_FAMILIES = ["gpt2", "neox", "llama"]
HF_VOCAB = 97
EOT = "<|endoftext|>"


def _tiny(kind: str, seed: int = 0, **overrides) -> nn.Module:
    """A 2-layer random model of one family (Llama with GQA: 4 query heads, 2 key/value heads)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=HF_VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=0, eos_token_id=0, **overrides)
        model = GPT2LMHeadModel(cfg)
    elif kind == "neox":
        cfg = GPTNeoXConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25,
                            bos_token_id=0, eos_token_id=0, **overrides)
        model = GPTNeoXForCausalLM(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(vocab_size=HF_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          bos_token_id=0, eos_token_id=0, pad_token_id=0, **overrides)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.generation_config.pad_token_id = 0
    return model.eval()


@torch.no_grad()
def _randomise_temperatures(model: nn.Module, seed: int = 1, scale: float = 0.5) -> None:
    """Non-trivial temperatures: random read-outs / MLP weights and position coefficients."""
    from selective_attention.temperature import TemperatureFunction

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, TemperatureFunction):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def _ids(B: int = 2, T: int = 9, seed: int = 3, vocab: int = HF_VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (B, T), generator=g)


def _byte_tokenizer():
    """A 257-token byte-level tokenizer (no merges) built locally: nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOT] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)


def _tiny_llama_257(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      bos_token_id=256, eos_token_id=256, pad_token_id=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny() -> Callable[..., nn.Module]:
    """tiny(kind, seed=0, **config_overrides): a 2-layer random GPT-2 / GPT-NeoX / Llama (GQA) model."""
    return _tiny


@pytest.fixture(params=HF_FAMILIES)
def family(request) -> str:
    """Each tiny family in turn ("gpt2", "neox", "llama")."""
    return request.param


@pytest.fixture
def randomise_temperatures() -> Callable[..., None]:
    return _randomise_temperatures


@pytest.fixture
def ids() -> Callable[..., torch.Tensor]:
    """ids(B=2, T=9, seed=3, vocab=97): random token ids (never 0, the pad id)."""
    return _ids


@pytest.fixture
def byte_tokenizer():
    return _byte_tokenizer()


@pytest.fixture
def tiny_llama_257() -> Callable[..., nn.Module]:
    """tiny_llama_257(seed=0): a tiny Llama over the 257 ids of ``byte_tokenizer``."""
    return _tiny_llama_257


def _check_cached_decoding(model: nn.Module, x: torch.Tensor, full: torch.Tensor, start: int = 5) -> None:
    """Prefill x[:, :start], then one token at a time: each step's logits equal the full forward's (1e-4)."""
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        step = model(x[:, :start], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(step, full[:, :start], atol=1e-4, rtol=0)
        for t in range(start, x.shape[1]):
            step = model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-4, rtol=0)


@pytest.fixture
def check_cached_decoding() -> Callable[..., None]:
    """check_cached_decoding(model, x, full_logits, start=5): cached decoding reproduces the full forward."""
    return _check_cached_decoding
