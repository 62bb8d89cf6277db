"""Evaluation: perplexity (token- and word-level), zero-shot benchmarks through lm-eval, passkey retrieval."""

from selective_attention.evaluate.passkey import passkey
from selective_attention.evaluate.perplexity import perplexity
from selective_attention.evaluate.tasks import zero_shot

__all__ = ["perplexity", "zero_shot", "passkey"]
