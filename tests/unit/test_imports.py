"""The import graph of slim keeps its layers: no cycles (function-level imports included), numerics import nothing
above them, and nothing reaches into another module's private names. Read from the source with ast, so an import
hidden inside a function counts the same as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import slim

ROOT = Path(slim.__file__).resolve().parent
# module prefix -> the slim modules it may import (besides itself and its own package)
ALLOWED = {
    "slim.quant": ("slim.quant", "slim.kernels", "slim.errors"),
    "slim.kernels": ("slim.cache", "slim.errors"),
    "slim.errors": (),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, list[str]]:
    """{imported slim module: [names taken from it]} for every import statement anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("slim"):
                    found.setdefault(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("slim"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from slim.quant import fp8` imports the module slim.quant.fp8
                    found.setdefault(sub, [])
                else:
                    found.setdefault(base, []).append(alias.name)
    found.pop(name, None)
    return {m: names for m, names in found.items() if m in modules}


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # a package importing its own submodules (slim.formats -> slim.formats.base) is no cycle unless one imports back
    assert _cycles() == []


def test_layers_import_nothing_above_them():
    bad = []
    for name, deps in GRAPH.items():
        for prefix, allowed in ALLOWED.items():
            if name == prefix or name.startswith(prefix + "."):
                bad += [f"{name} -> {d}" for d in deps
                        if not any(d == a or d.startswith(a + ".") for a in allowed + (prefix,))]
    assert bad == []


def test_only_the_entry_point_imports_the_pipeline():
    importers = sorted(n for n, deps in GRAPH.items() if "slim.pipeline" in deps or "slim.main" in deps)
    assert importers == ["slim.main"]


def test_no_private_names_across_modules():
    leaks = [f"{name} takes {m}.{n}" for name, deps in GRAPH.items() for m, names in deps.items()
             for n in names if n.startswith("_") and not n.startswith("__")]
    assert leaks == []


def test_the_checker_sees_function_level_imports(tmp_path):
    """A cycle through an import inside a function is still found (the checker reads every statement)."""
    src = "def f():\n    from slim.pipeline import run\n"
    assert "slim.pipeline" in {m for m in _imports("slim.quant.x", _write(tmp_path, src), _modules())}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.py"
    path.write_text(text)
    return path


def test_every_mode_has_a_runner():
    from slim.config import MODES
    from slim.pipeline import MODE_RUNNERS

    assert tuple(MODE_RUNNERS) == MODES


def test_test_modules_have_unique_names():
    """pytest imports test modules by basename (the test folders are not packages): two of one name stop the whole
    suite at collection."""
    tests = ROOT.parent / "tests"
    names = [p.name for p in tests.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
