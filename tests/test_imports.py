"""No import cycle among amrepro's modules, counting the imports inside functions too: a cycle is a layering
fault (commands <-> sweep was one) that a lazy import only hides until someone moves it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "amrepro"


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _packages(module: str) -> list[str]:
    """"a.b.c" -> ["a", "a.b"]: the packages whose __init__ runs before the module does."""
    return [module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)]


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the modules of the package it imports anywhere in its file."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from . import x` imports the module x; `from .m import f` imports the module m
                found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            # importing a.b.c first runs the package a.b's __init__ (unless the importer is inside a.b: then it ran
            # already), so a module kept in a package whose __init__ imports the importer back is still a cycle
            found += [p for m in found for p in _packages(m) if p not in _packages(name)]
            graph[name] |= {m for m in found if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by a depth-first search (each back edge closes one)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert "amrepro.layout" in graph["amrepro.sweep"]  # the graph sees imports (a parser that sees none passes)
    assert "amrepro.sweep" in graph["amrepro.commands.sweep"]  # ... in functions and packages too
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    """Config importing a registry module kept in a package whose __init__ imports Config: a cycle at import."""
    (tmp_path / "pkg" / "methods").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "config.py").write_text("from .methods.spec import Spec\n")
    (tmp_path / "pkg" / "methods" / "__init__.py").write_text("from ..config import Config\n")
    (tmp_path / "pkg" / "methods" / "spec.py").write_text("import dataclasses\n")
    graph = import_graph(tmp_path / "pkg")
    assert graph["pkg.methods.spec"] == set()  # its own package ran before it: no edge
    assert cycles(graph) == [["pkg.config", "pkg.methods", "pkg.config"]]
