import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

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
        cfg = GPT2Config(
            vocab_size=HF_VOCAB,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
            **overrides,
        )
        model = GPT2LMHeadModel(cfg)
    elif kind == "neox":
        cfg = GPTNeoXConfig(
            vocab_size=HF_VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            rotary_pct=0.25,
            bos_token_id=0,
            eos_token_id=0,
            **overrides,
        )
        model = GPTNeoXForCausalLM(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(
            vocab_size=HF_VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            **overrides,
        )
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
    cfg = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
    )
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
    import inspect

    from transformers import DynamicCache

    # transformers 5.x renames past_key_values to cache (the old name is deprecated): pass what this version takes
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        step = model(x[:, :start], **{name: cache}, use_cache=True).logits
        torch.testing.assert_close(step, full[:, :start], atol=1e-4, rtol=0)
        for t in range(start, x.shape[1]):
            step = model(x[:, t : t + 1], **{name: cache}, use_cache=True).logits
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-4, rtol=0)


@pytest.fixture
def check_cached_decoding() -> Callable[..., None]:
    """check_cached_decoding(model, x, full_logits, start=5): cached decoding reproduces the full forward."""
    return _check_cached_decoding


# ---- a small word corpus for training tests (test_train, test_methods)

WORDS = "the cat dog sat on mat ran far away home red blue big small tree house river stone light dark".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """120 short documents of random sentences over a 20-word vocabulary, as a .txt corpus."""
    import random

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    rng = random.Random(0)
    docs = [
        " ".join(
            " ".join(rng.choices(WORDS, k=rng.randint(5, 12))).capitalize() + "." for _ in range(rng.randint(2, 6))
        )
        for _ in range(120)
    ]
    path.write_text("\n\n".join(docs) + "\n")
    return path


# ---- what a source file imports (test_report, test_stats)


def _file_imports(path: Path) -> set[str]:
    """Every module a file imports (top level or inside functions), as absolute names; no relative imports."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path.name}: relative import")
    return out


@pytest.fixture
def file_imports() -> Callable[[Path], set[str]]:
    return _file_imports


# ---- training runs (test_train, test_runsafety)


@pytest.fixture
def cfg(corpus, tmp_path):
    """A few hundred tokens on the tiny model: 4 optimizer steps of 4 x 32 tokens."""
    from selective_attention.train import TrainConfig

    return TrainConfig(
        data=str(corpus),
        size="tiny",
        vocab_size=300,
        seq_len=32,
        batch_size=4,
        max_tokens=512,
        eval_every=2,
        eval_tokens=128,
        log_every=1,
        out=str(tmp_path / "run"),
        progress=False,
        cache_dir=str(tmp_path.parent / "ssa-cache"),
        warmup=1,
    )


@pytest.fixture
def weights() -> Callable[[str | Path], dict[str, torch.Tensor]]:
    """weights(run_dir): the final model's tensors."""
    from safetensors.torch import load_file

    return lambda run: load_file(str(Path(run) / "final" / "model.safetensors"))


@pytest.fixture
def metrics() -> Callable[[str | Path], list[dict]]:
    """metrics(run_dir): the lines of metrics.jsonl."""
    import json

    return lambda run: [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def cli_args() -> Callable[..., list[str]]:
    """cli_args(cfg, *extra): an `ssa train` command line for the tiny test run of ``cfg``."""

    def args(cfg, *extra: str) -> list[str]:
        return [
            "train",
            "--data",
            cfg.data,
            "--size",
            "tiny",
            "--vocab-size",
            "300",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--max-tokens",
            "256",
            "--eval-every",
            "0",
            "--eval-tokens",
            "64",
            "--cache-dir",
            cfg.cache_dir,
            "--out",
            cfg.out,
            "--no-progress",
            *extra,
        ]

    return args
