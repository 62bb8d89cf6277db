"""The hf/ package is a set of small modules without import cycles; registering with transformers is explicit."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import selective_attention.hf as hf

HF_DIR = Path(hf.__file__).parent
PKG = "selective_attention.hf"


def _module_name(path: Path) -> str:
    rel = path.relative_to(HF_DIR).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PKG, *parts])


def _hf_imports(path: Path) -> set[str]:
    """Every selective_attention.hf module imported anywhere in ``path`` (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PKG):
            out.add(node.module)
            for a in node.names:  # "from selective_attention.hf.adapters import gpt2" imports a module too
                if (HF_DIR / Path(*node.module.split(".")[2:]) / f"{a.name}.py").is_file():
                    out.add(f"{node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(PKG)}
    return out


def test_the_import_graph_of_hf_is_acyclic() -> None:
    modules = {_module_name(p): p for p in HF_DIR.rglob("*.py")}
    assert {f"{PKG}.site", f"{PKG}.hooks", f"{PKG}.attention", f"{PKG}.adapters", f"{PKG}.adapters.common"} <= set(
        modules
    )
    graph = {m: {d for d in _hf_imports(p) if d in modules and d != m} for m, p in modules.items()}
    # a package's __init__ may import its submodules; a submodule importing its package's __init__ is a cycle
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, f"import cycle: {' -> '.join([*stack, m])}"
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
    # adapters import only the shared helpers and the site description, never each other or convert
    for m, deps in graph.items():
        if m.startswith(f"{PKG}.adapters.") and m != f"{PKG}.adapters.common":
            assert deps <= {f"{PKG}.site", f"{PKG}.adapters.common"}, (m, deps)


def test_each_hf_module_imports_alone_and_nothing_registers_at_import() -> None:
    names = sorted(_module_name(p) for p in HF_DIR.rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for k in [k for k in sys.modules if k.startswith('selective_attention')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(name)\n"
        "from transformers import AttentionInterface\n"
        "assert 'ssa' not in AttentionInterface._global_mapping, 'registered at import'\n"
        "assert 'peft' not in sys.modules, 'peft imported at import time'\n"
        "from selective_attention.hf import register\n"
        "register(); register()\n"
        "assert 'ssa' in AttentionInterface._global_mapping and 'ssa_eager' in AttentionInterface._global_mapping\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
