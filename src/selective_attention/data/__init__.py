"""Corpora, tokenizers and memory-mapped token caches.

``corpora.load_documents(source, split, seed)``, ``tokenizers.build_tokenizer(kind, ...)`` and
``tokens.prepare(source, tokenizer, ...)``.
"""

from selective_attention.data.corpora import load_documents, resolve_source, split_documents
from selective_attention.data.tokenizers import build_tokenizer
from selective_attention.data.tokens import TokenizedCorpus, prepare

__all__ = ["load_documents", "resolve_source", "split_documents", "build_tokenizer", "prepare", "TokenizedCorpus"]
