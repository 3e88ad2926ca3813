"""The package layout tells the architecture (docs/engine.md, "Where the code lives"): the engine
imports nothing around it, and the top-level folders import each other one way only. Read from
the source (every import statement, also those inside functions), so that an import added
anywhere is checked."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dgating_surgery"
SHARED = {"errors"}  # top-level modules every part may import (the exception classes)


def _modules() -> dict[str, Path]:
    """Dotted name inside the package (``engine.gates``, ``cli``) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The modules of this package that ``name`` imports (dotted, inside the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "dgating_surgery" or (node.module or "").startswith("dgating_surgery."):
                target = node.module.removeprefix("dgating_surgery").lstrip(".")
            else:
                continue
            found.update(f"{target}.{a.name}".lstrip(".") for a in node.names)  # a submodule, or a name of target
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("dgating_surgery").lstrip(".") for a in node.names
                         if a.name == "dgating_surgery" or a.name.startswith("dgating_surgery."))
    return found


def _unit(dotted: str) -> str:
    return dotted.split(".")[0]


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules of this package it imports. The package's ``__init__`` (the public
    facade, which names every module) is left out."""
    modules = _modules()
    return {name: {t for t in _imports(name, path) if t in modules and t and t != name}
            for name, path in modules.items() if name}


def _folder_graph() -> dict[str, set[str]]:
    """Top-level unit (a folder, or a top-level module) -> the other units it imports."""
    graph: dict[str, set[str]] = {}
    for name, targets in _module_graph().items():
        graph.setdefault(_unit(name), set()).update(_unit(t) for t in targets if _unit(t) != _unit(name))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (depth-first), or None."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_the_engine_imports_nothing_around_it():
    modules = _modules()
    outside = {}
    for name, path in modules.items():
        if _unit(name) != "engine":
            continue
        bad = sorted(t for t in _imports(name, path) if t in modules and _unit(t) != "engine" and t not in SHARED)
        if bad:
            outside[name] = bad
    assert not outside, f"engine modules import code around the engine: {outside}"


def test_the_top_level_folders_import_each_other_one_way():
    graph = _folder_graph()
    assert {"engine", "training", "checkpoints", "integrations", "plugins", "cli"} <= set(graph)
    assert _cycle(graph) is None, f"import cycle between top-level folders: {' -> '.join(_cycle(graph))}"


def test_no_module_imports_itself_through_others():
    """Also the imports inside functions: a cycle there (gates, gate_modes and wrappers had one) means
    two modules that cannot be read, tested or moved apart."""
    graph = _module_graph()
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_checks_see_imports():
    """The parser finds what a module imports (relative, absolute, inside functions) and the cycle
    finder finds a cycle, so that the tests above cannot pass on an empty graph."""
    modules = _modules()
    assert {"engine.gates", "errors", "engine.rules.normalization"} <= _imports("engine.shrink", modules["engine.shrink"])
    assert "engine.gates" in _imports("cli.convert", modules["cli.convert"])  # imported inside the command
    assert "engine" in _folder_graph()["plugins"] and "training" in _folder_graph()["integrations"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
