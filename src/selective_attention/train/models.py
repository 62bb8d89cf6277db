"""Named model sizes, built as ``transformers`` configs, and the SSA conversion of a freshly built model.

| size         | family   | d_model | layers | heads | ffn  | params (vocab 8192)  |
|--------------|----------|---------|--------|-------|------|----------------------|
| tiny         | Llama    | 128     | 2      | 4     | 384  | ~1.5M (tests, CPU)   |
| small        | Llama    | 384     | 6      | 6     | 1024 | ~13.8M (CPU runs)    |
| study        | Llama    | 192     | 4      | 6     | 512  | 2.16M at vocab 2048: |
|              |          |         |        |       |      | 1.77M body, 0.39M    |
|              |          |         |        |       |      | embedding (the LM    |
|              |          |         |        |       |      | study, seq 512)      |
| gpt2-124m    | GPT-2    | 768     | 12     | 12    | 3072 | 124M at vocab 50257  |
| pythia-160m  | GPT-NeoX | 768     | 12     | 12    | 3072 | 162M at vocab 50304  |

Input and output embeddings are tied (as in GPT-2 and nanoGPT), except for the Pythia shape (untied, as in
Pythia). The vocabulary is the tokenizer's, rounded up to a multiple of 64 (faster matmuls; the extra rows are
never targets).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig

from selective_attention.config import SSAConfig
from selective_attention.errors import UserError
from selective_attention.utils.packages import resolve_model


def _llama(d: int, layers: int, heads: int, ffn: int) -> Callable[[int, int], PretrainedConfig]:
    def build(vocab: int, seq_len: int) -> PretrainedConfig:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=seq_len,
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            initializer_range=0.02,
        )

    return build


def _gpt2(vocab: int, seq_len: int) -> PretrainedConfig:
    return GPT2Config(
        vocab_size=vocab, n_positions=max(seq_len, 1024), n_embd=768, n_layer=12, n_head=12, tie_word_embeddings=True
    )


def _pythia(vocab: int, seq_len: int) -> PretrainedConfig:
    return GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=max(seq_len, 2048),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )


SIZES: dict[str, Callable[[int, int], PretrainedConfig]] = {
    "tiny": _llama(128, 2, 4, 384),
    "small": _llama(384, 6, 6, 1024),
    "study": _llama(192, 4, 6, 512),
    "gpt2-124m": _gpt2,
    "pythia-160m": _pythia,
}


def model_config(size: str, vocab_size: int, seq_len: int) -> PretrainedConfig:
    if size not in SIZES:
        raise UserError(f"unknown model size {size!r}: use one of {', '.join(SIZES)}")
    vocab = -(-vocab_size // 64) * 64
    return SIZES[size](vocab, seq_len)


def build_model(
    size: str, vocab_size: int, seq_len: int, attention: str = "vanilla", ssa: SSAConfig | None = None, seed: int = 0
) -> torch.nn.Module:
    """A randomly initialised causal LM of a named size (float32), SSA-converted when ``attention == "ssa"``."""
    from transformers import AutoModelForCausalLM

    cfg = model_config(size, vocab_size, seq_len)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if attention == "vanilla":
        return model
    if attention != "ssa":
        raise UserError(f"unknown attention {attention!r}: use vanilla or ssa (other methods: methods.apply_method)")
    from selective_attention import hf

    return hf.convert(model, ssa or SSAConfig())


def load_init(path: str) -> torch.nn.Module:
    """The model of a Hugging Face folder (plain, SSA, or another method's: methods.load_model) or a .gguf
    file, with float32 master weights; UserError (one line) when it cannot be loaded."""
    from selective_attention import hf
    from selective_attention.methods import load_model

    p = resolve_model(path)  # a path, or a bundled model's name (smollm2-135m)
    model = load_model(p) if p.is_dir() else hf.load_pretrained(p, dtype=torch.float32)[0]
    for prm in model.parameters():  # float32 master weights (a de-quantised GGUF model refuses .float())
        if prm.dtype != torch.float32:
            prm.data = prm.data.float()
    return model
