"""The house rule, read from the code: which package may import which, and no import cycle.

    core (config, functional, temperature, layer) imports nothing above it; hf -> core; methods (the registry of
    attention methods) -> hf, core; data -> core; train -> methods, data, hf, core;
    evaluate -> methods, hf, data, core; experiments -> train, evaluate (and below); bench -> train (and below);
    report reads results JSON only (utils, errors); demo -> experiments, evaluate, report (and below);
    utils is a leaf; cli/ is the face: the only package that parses arguments, and it may import anything.

Every import counts, also those inside functions (a lazy import is still a dependency). Nothing imports cli/ but
the entry points (``__main__``), and no module outside cli/ imports argparse: libraries take keyword arguments.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "selective_attention"
PKG = "selective_attention"
CORE = {"config", "functional", "temperature", "layer"}
LEAVES = {"errors", "utils"}
ALLOWED: dict[str, set[str]] = {
    "core": CORE | LEAVES,
    "utils": {"errors", "utils"},
    "errors": set(),
    "hf": {"hf"} | CORE | LEAVES,
    "data": {"data"} | CORE | LEAVES,  # data needs no model code
    "methods": {"methods", "hf"} | CORE | LEAVES,
    "train": {"train", "methods", "data", "hf"} | CORE | LEAVES,
    "evaluate": {"evaluate", "methods", "data", "hf"} | CORE | LEAVES,
    "bench": {"bench", "train", "methods", "data", "hf"} | CORE | LEAVES,
    "experiments": {"experiments", "train", "methods", "evaluate", "data", "hf"} | CORE | LEAVES,
    "report": {"report"} | LEAVES,
    "demo": {"demo", "experiments", "train", "methods", "evaluate", "report", "data", "hf"} | CORE | LEAVES,
}
FACE = {"cli", "__main__", "__init__"}  # may import anything


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = [PKG, *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every selective_attention module ``path`` imports (absolute or relative), anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PKG)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != PKG:
                continue
            for a in node.names:  # `from pkg.sub import module` imports a module, not just a name
                sub = f"{mod}.{a.name}"
                found.add(sub if _exists(sub) else mod)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _area(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _layer(area: str) -> str:
    return "core" if area in CORE else area


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): {m for m in _imports(p) if _exists(m)} for p in SRC.rglob("*.py")}


def test_every_import_follows_the_layering_rule():
    bad = []
    for module, deps in _graph().items():
        area = _area(module)
        if area in FACE:
            continue
        allowed = ALLOWED[_layer(area)]
        for dep in deps:
            dep_area = _area(dep)
            if dep_area == "__init__" or dep_area not in allowed:
                bad.append(f"{module} -> {dep}")
    assert not bad, "imports that break the layering rule:\n" + "\n".join(sorted(bad))


def test_only_the_entry_points_import_cli():
    bad = sorted(
        m
        for m, deps in _graph().items()
        if _area(m) not in {"cli", "__main__"} and any(_area(d) == "cli" for d in deps)
    )
    assert not bad, "modules that import selective_attention.cli (only the entry points may):\n" + "\n".join(bad)


def _imports_argparse(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "argparse" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "argparse":
            return True
    return False


def test_only_cli_parses_arguments():
    """Libraries expose plain functions with keyword arguments; argument parsing lives in cli/ alone."""
    found = {_module_name(p) for p in SRC.rglob("*.py") if _area(_module_name(p)) != "cli" and _imports_argparse(p)}
    assert not found, "modules outside cli/ that import argparse:\n" + "\n".join(sorted(found))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == node or (node.startswith(dep + ".") and dep in graph):
                continue  # a package's own submodule importing the package's name: resolved by Python
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _package_names(package: str) -> set[str] | None:
    """The names a package's __init__.py binds at its top level (None: it has a module ``__getattr__``, so any
    name may resolve)."""
    tree = ast.parse((SRC / Path(*package.split(".")[1:]) / "__init__.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return None if "__getattr__" in names else names


def _dangling_imports(path: Path) -> list[str]:
    """The selective_attention modules (and names of its packages) that ``path`` imports but that do not exist."""
    dangling = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == PKG:
            module = node.module or PKG
            if module != PKG and not _exists(module):
                dangling.append(module)
            elif (SRC / Path(*module.split(".")[1:]) / "__init__.py").is_file():
                # `from pkg.package import name`: a submodule of the package or a name its __init__ binds
                bound = _package_names(module)
                dangling += [
                    f"{module}.{a.name}"
                    for a in node.names
                    if bound is not None and a.name not in bound and not _exists(f"{module}.{a.name}")
                ]
        elif isinstance(node, ast.Import):
            dangling += [a.name for a in node.names if a.name.split(".")[0] == PKG and not _exists(a.name)]
    return dangling


def test_every_package_import_resolves():
    """A module that moved leaves no import behind, in the package, its scripts or its tests (a lazy import
    inside a function would otherwise fail only when that function runs)."""
    root = SRC.parents[1]
    files = [*SRC.rglob("*.py"), *(root / "scripts").glob("*.py"), *(root / "tests").glob("*.py")]
    dangling = [f"{path.relative_to(root)}: {name}" for path in files for name in _dangling_imports(path)]
    assert not dangling, "imports of modules that do not exist:\n" + "\n".join(dangling)


def test_the_checks_see_what_they_look_for(tmp_path):
    """The helpers behind the rules find a lazy argparse import and a name a package does not have."""
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    import argparse\n\n    return argparse\n")
    assert _imports_argparse(lazy)
    assert not _imports_argparse(SRC / "bench" / "train_bench.py")
    moved = tmp_path / "moved.py"
    moved.write_text(
        "from selective_attention.bench import nowhere, train_bench\n"
        "from selective_attention import SSAConfig, convert, anything_lazy\n"  # the root's __getattr__ resolves
        "import selective_attention.gone\n"
    )
    assert _dangling_imports(moved) == ["selective_attention.bench.nowhere", "selective_attention.gone"]


@pytest.mark.parametrize("area", sorted(ALLOWED))
def test_rule_table_names_real_packages(area):
    """The table above must not silently pass because a package was renamed."""
    assert area in CORE | {"core"} or (SRC / area).is_dir() or (SRC / f"{area}.py").is_file()
