"""storage/'s imports run one way: no module of it imports, even inside a function, one that
imports it back; and the daemons reach it through its face (`storage`) alone."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path, package: str) -> set[str]:
    """The modules of `package` that `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == package:
                found |= {f"{package}.{alias.name}" for alias in node.names}  # a module, or a name of the face
            elif node.module.startswith(package + "."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith(package + ".")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"storage.{p.stem}": p for p in (ROOT / "storage").glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path, "storage") & modules.keys() - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target, path + [target])):
                return found
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [name])):
            return found
    return None


def test_storage_has_no_import_cycle():
    graph = _graph()
    assert len(graph) > 15, "storage's modules were not found"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_daemons_import_the_face_of_storage_only():
    offenders = []
    for package in ("mtad", "imapd", "pop3d"):
        for path in sorted((ROOT / package).glob("**/*.py")):
            inner = _imports(path, "storage") - {f"storage.{name}" for name in _face()}
            offenders += [f"{path.relative_to(ROOT)}: {module}" for module in sorted(inner)]
    assert not offenders, offenders


def _face() -> set[str]:
    import storage

    return set(storage.__all__)
